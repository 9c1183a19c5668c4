//! Object rules shared by the verbs: type checks, names and validation, defaults, metadata on
//! create and update, the status-subresource split, deletion with finalizers and grace periods,
//! garbage collection of dependents, and namespace termination.

use rand::Rng;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::resources::{self, ResourceInfo};
use super::status::{ApiError, Cause};
use super::store::{ResourceId, Scan, Store, StoreError};

/// The `namespaces` resource.
pub fn namespace_info() -> &'static ResourceInfo {
    resources::lookup("", "v1", "namespaces").expect("namespaces is a builtin resource")
}

/// Namespaces kube-apiserver's NamespaceLifecycle admission refuses to delete.
pub const IMMORTAL_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];

/// Refuses the deletion of an immortal namespace with kube-apiserver's 403 and wording.
pub fn check_deletable(info: &ResourceInfo, name: &str) -> Result<(), ApiError> {
    if info.plural == "namespaces" && IMMORTAL_NAMESPACES.contains(&name) {
        return Err(ApiError::forbidden_object(
            info.group,
            info.plural,
            name,
            "this namespace may not be deleted",
        ));
    }
    Ok(())
}

/// Kubernetes timestamps: RFC 3339, UTC, whole seconds.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// `kind` and `apiVersion`, when given, must name this resource.
pub fn check_type(info: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
    if let Some(kind) = object["kind"].as_str()
        && !kind.is_empty()
        && kind != info.kind
    {
        return Err(ApiError::bad_request(format!(
            "the object's kind {kind:?} does not match the resource {} (kind {})",
            info.plural, info.kind
        )));
    }
    if let Some(v) = object["apiVersion"].as_str()
        && !v.is_empty()
        && v != info.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the object's apiVersion {v:?} does not match {}",
            info.api_version()
        )));
    }
    if !object["metadata"].is_object() && !object["metadata"].is_null() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    check_shape(info, object)
}

/// The fields the server fills in or reads by index must have their schema's JSON type, as the
/// apiserver's decoding into typed structs requires: `spec` and `status` objects, and for pods
/// the container, toleration and volume lists arrays of objects. Defaulting and the update
/// rules index into them, which would panic on a string.
fn check_shape(info: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
    let wrong = |field: &str, want: &str| {
        Err(ApiError::bad_request(format!(
            "{} {field} must be {want}",
            info.kind
        )))
    };
    for field in ["spec", "status"] {
        if !object[field].is_null() && !object[field].is_object() {
            return wrong(field, "an object");
        }
    }
    if info.plural == "pods" {
        for list in ["containers", "initContainers", "tolerations", "volumes"] {
            let value = &object["spec"][list];
            let objects_only = value
                .as_array()
                .is_some_and(|items| items.iter().all(Value::is_object));
            if !value.is_null() && !objects_only {
                return wrong(&format!("spec.{list}"), "a list of objects");
            }
        }
    }
    Ok(())
}

/// The name in a request body, for error messages.
pub fn name_of_body(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["metadata"]["name"].as_str().map(String::from))
        .unwrap_or_default()
}

pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub(super) fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

pub(super) fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

fn validate_name(info: &ResourceInfo, name: &str, causes: &mut Vec<Cause>) {
    if info.plural == "services" && info.group.is_empty() {
        return super::services::validate_service_name(name, causes);
    }
    let ok = match info.plural {
        "namespaces" => is_dns_label(name),
        "customresourcedefinitions" => is_dns_subdomain(name) && name.contains('.'),
        _ => is_dns_subdomain(name),
    };
    if !ok {
        causes.push(Cause {
            field: "metadata.name".into(),
            message: format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                if info.plural == "namespaces" { "label" } else { "subdomain" }
            ),
        });
    }
}

fn validate_labels(object: &Value, causes: &mut Vec<Cause>) {
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            if !is_qualified_name(key) {
                causes.push(Cause {
                    field: "metadata.labels".into(),
                    message: format!("Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.'"),
                });
            }
            match value.as_str() {
                Some(v) if v.is_empty() || is_label_name(v) => {}
                _ => causes.push(Cause {
                    field: "metadata.labels".into(),
                    message: format!("Invalid value: {value}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"),
                }),
            }
        }
    }
    if let Some(annotations) = object["metadata"]["annotations"].as_object() {
        for (key, value) in annotations {
            if !is_qualified_name(key) || !value.is_string() {
                causes.push(Cause {
                    field: "metadata.annotations".into(),
                    message: format!("Invalid value: {key:?}: annotation keys must be qualified names and values strings"),
                });
            }
        }
    }
}

/// Validates a pod's `spec` (also run on pod templates by [`super::workloads`], with the
/// field paths moved under the template).
pub(super) fn validate_pod(object: &Value, causes: &mut Vec<Cause>) {
    let containers = object["spec"]["containers"].as_array();
    match containers {
        None => causes.push(Cause {
            field: "spec.containers".into(),
            message: "Required value".into(),
        }),
        Some(list) if list.is_empty() => causes.push(Cause {
            field: "spec.containers".into(),
            message: "Required value".into(),
        }),
        Some(_) => {}
    }
    let mut seen = std::collections::HashSet::new();
    for (field, list) in [
        (
            "spec.initContainers",
            object["spec"]["initContainers"].as_array(),
        ),
        ("spec.containers", containers),
    ] {
        for (i, c) in list.into_iter().flatten().enumerate() {
            let name = c["name"].as_str().unwrap_or_default();
            if !is_dns_label(name) {
                causes.push(Cause {
                    field: format!("{field}[{i}].name"),
                    message: format!("Invalid value: {name:?}: must be a DNS-1123 label"),
                });
            } else if !seen.insert(name.to_string()) {
                causes.push(Cause {
                    field: format!("{field}[{i}].name"),
                    message: format!("Duplicate value: {name:?}"),
                });
            }
            if c["image"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause {
                    field: format!("{field}[{i}].image"),
                    message: "Required value".into(),
                });
            }
        }
    }
    validate_tolerations(object, causes);
    validate_volume_paths(object, causes);
}

/// Kubernetes' `validateLocalNonReservedPath` for the file a volume item writes: required,
/// relative, no `..` component, and not starting with `..` (the kubelet's `..data` and
/// timestamped directories live there).
fn validate_item_path(field: String, path: Option<&str>, causes: &mut Vec<Cause>) {
    let path = path.unwrap_or_default();
    if path.is_empty() {
        causes.push(Cause {
            field,
            message: "Required value".into(),
        });
        return;
    }
    if path.starts_with('/') {
        causes.push(Cause {
            field: field.clone(),
            message: format!("Invalid value: {path:?}: must be a relative path"),
        });
    } else if path.split('/').any(|part| part == "..") {
        causes.push(Cause {
            field: field.clone(),
            message: format!("Invalid value: {path:?}: must not contain '..'"),
        });
    }
    // Not said twice when the `..` component was already reported.
    if path.starts_with("..") && !path.starts_with("../") {
        causes.push(Cause {
            field,
            message: format!("Invalid value: {path:?}: must not start with '..'"),
        });
    }
}

/// The `items[].path` of every ConfigMap, Secret and downward API volume, plain or projected,
/// and the `path` of projected service-account tokens.
fn validate_volume_paths(object: &Value, causes: &mut Vec<Cause>) {
    let items = |source: &Value, at: &str, causes: &mut Vec<Cause>| {
        for (j, item) in source["items"].as_array().into_iter().flatten().enumerate() {
            validate_item_path(
                format!("{at}.items[{j}].path"),
                item["path"].as_str(),
                causes,
            );
        }
    };
    let volumes = object["spec"]["volumes"].as_array().into_iter().flatten();
    for (i, volume) in volumes.enumerate() {
        let at = format!("spec.volumes[{i}]");
        for kind in ["configMap", "secret", "downwardAPI"] {
            if volume[kind].is_object() {
                items(&volume[kind], &format!("{at}.{kind}"), causes);
            }
        }
        let sources = volume["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten();
        for (k, source) in sources.enumerate() {
            let at = format!("{at}.projected.sources[{k}]");
            for kind in ["configMap", "secret", "downwardAPI"] {
                if source[kind].is_object() {
                    items(&source[kind], &format!("{at}.{kind}"), causes);
                }
            }
            if source["serviceAccountToken"].is_object() {
                validate_item_path(
                    format!("{at}.serviceAccountToken.path"),
                    source["serviceAccountToken"]["path"].as_str(),
                    causes,
                );
            }
        }
    }
}

/// Kubernetes' `ValidateTolerations`.
fn validate_tolerations(object: &Value, causes: &mut Vec<Cause>) {
    let tolerations = object["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten();
    for (i, toleration) in tolerations.enumerate() {
        let field = |name: &str| format!("spec.tolerations[{i}].{name}");
        let text = |name: &str| toleration[name].as_str().unwrap_or_default();
        let (key, operator, value, effect) =
            (text("key"), text("operator"), text("value"), text("effect"));
        if !key.is_empty() && !is_qualified_name(key) {
            causes.push(Cause {
                field: field("key"),
                message: format!("Invalid value: {key:?}: must be a qualified name"),
            });
        }
        if key.is_empty() && operator != "Exists" {
            causes.push(Cause {
                field: field("operator"),
                message: format!("Invalid value: {operator:?}: operator must be Exists when `key` is empty, which means \"match all values and all keys\""),
            });
        }
        if !toleration["tolerationSeconds"].is_null() && effect != "NoExecute" {
            causes.push(Cause {
                field: field("effect"),
                message: format!("Invalid value: {effect:?}: effect must be 'NoExecute' when `tolerationSeconds` is set"),
            });
        }
        match operator {
            "" | "Equal" => {}
            "Exists" if value.is_empty() => {}
            "Exists" => causes.push(Cause {
                field: field("operator"),
                message: format!(
                    "Invalid value: {value:?}: value must be empty when `operator` is 'Exists'"
                ),
            }),
            other => causes.push(Cause {
                field: field("operator"),
                message: format!(
                    "Unsupported value: {other:?}: supported values: \"Equal\", \"Exists\""
                ),
            }),
        }
        if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            causes.push(Cause {
                field: field("effect"),
                message: format!("Unsupported value: {effect:?}: supported values: \"NoExecute\", \"NoSchedule\", \"PreferNoSchedule\""),
            });
        }
    }
}

/// Kubernetes' rule for tolerations on a pod update: every existing toleration stays and only
/// its `tolerationSeconds` may change (or go); new tolerations may be added.
fn tolerations_update_allowed(current: &Value, new: &Value) -> bool {
    // Go compares the structs: an absent string equals "", so empty strings and nulls go.
    let normal = |toleration: &Value| -> Value {
        let mut fields = toleration.as_object().cloned().unwrap_or_default();
        fields.remove("tolerationSeconds");
        fields.retain(|_, v| !(v.is_null() || v == ""));
        Value::Object(fields)
    };
    let kept: Vec<Value> = new["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(normal)
        .collect();
    current["spec"]["tolerations"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|old| kept.contains(&normal(old)))
}

fn validate_secret_and_configmap(info: &ResourceInfo, object: &Value, causes: &mut Vec<Cause>) {
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 253
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    for field in ["data", "binaryData"] {
        if !object[field].is_null() && !object[field].is_object() {
            causes.push(Cause {
                field: field.into(),
                message: "Invalid value: must be a map of keys to values".into(),
            });
        }
        if let Some(map) = object[field].as_object() {
            for (k, v) in map {
                if !key_ok(k) {
                    causes.push(Cause {
                        field: format!("{field}[{k}]"),
                        message: "Invalid value: a valid config key must consist of alphanumeric characters, '-', '_' or '.'".into(),
                    });
                }
                let base64 = info.plural == "secrets" || field == "binaryData";
                if base64 && !v.as_str().is_some_and(is_base64) {
                    causes.push(Cause {
                        field: format!("{field}[{k}]"),
                        message: "Invalid value: must be base64-encoded".into(),
                    });
                } else if !base64 && !v.is_string() {
                    causes.push(Cause {
                        field: format!("{field}[{k}]"),
                        message: "Invalid value: must be a string".into(),
                    });
                }
            }
        }
    }
    // A ConfigMap's file names come from both maps: a key may be in only one of them.
    if info.plural == "configmaps"
        && let (Some(data), Some(binary)) =
            (object["data"].as_object(), object["binaryData"].as_object())
    {
        for key in data.keys().filter(|k| binary.contains_key(*k)) {
            causes.push(Cause {
                field: format!("data[{key}]"),
                message: format!("Invalid value: {key:?}: duplicate of key present in binaryData"),
            });
        }
    }
}

fn is_base64(s: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).is_ok()
}

fn validate(info: &ResourceInfo, object: &Value) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    validate_name(info, name, &mut causes);
    validate_labels(object, &mut causes);
    if info.plural == "cronjobs" {
        validate_cronjob_schedule(object, &mut causes);
    }
    match info.plural {
        "pods" => validate_pod(object, &mut causes),
        "secrets" | "configmaps" => validate_secret_and_configmap(info, object, &mut causes),
        "customresourcedefinitions" if info.group == super::crd::GROUP => {
            super::crd::validate_definition(object, &mut causes)
        }
        "services" | "endpoints" | "endpointslices" if !super::crd::is_custom(info) => {
            super::services::validate(info.plural, object, &mut causes)
        }
        _ => super::workloads::validate(info, object, &mut causes),
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_in(info.group, info.kind, name, causes))
    }
}

/// A CronJob's `spec.schedule` and `spec.timeZone`, read as the CronJob controller reads them
/// (`controllers::cronjob::validate`, kube-apiserver's messages).
fn validate_cronjob_schedule(object: &Value, causes: &mut Vec<Cause>) {
    let schedule = object["spec"]["schedule"].as_str().unwrap_or_default();
    let time_zone = object["spec"]["timeZone"].as_str();
    for (field, message) in controllers::cronjob::validate(schedule, time_zone) {
        let value = if field == "spec.timeZone" {
            time_zone.unwrap_or_default()
        } else {
            schedule
        };
        let message = if message == "Required value" {
            message
        } else {
            format!("Invalid value: {value:?}: {message}")
        };
        causes.push(Cause {
            field: field.into(),
            message,
        });
    }
}

/// `generateName` suffix: five characters from the apiserver's alphabet (no vowels, no
/// look-alike digits).
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = if last.contains('@') {
        return "IfNotPresent";
    } else {
        last.split_once(':').map(|(_, t)| t)
    };
    match tag {
        None | Some("latest") => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let has = |c: &Value, kind: &str| {
        c["resources"][kind]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    };
    if containers
        .iter()
        .all(|c| !has(c, "requests") && !has(c, "limits"))
    {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        let limits = &c["resources"]["limits"];
        let requests = &c["resources"]["requests"];
        ["cpu", "memory"]
            .iter()
            .all(|r| limits[r].is_string() && (requests[r].is_null() || requests[r] == limits[r]))
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The defaults of a `PodSpec` wherever one appears: a pod's spec and the pod template of a
/// workload (`spec.template.spec`), as kube-apiserver's `SetDefaults_PodSpec` and
/// `SetDefaults_Container` fill them in. `enableServiceLinks` is a pod's own default
/// ([`default_pod`]): templates do not get it.
pub(super) fn default_pod_spec(spec: &mut Value) {
    for (key, value) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
    ] {
        if spec[key].is_null() {
            spec[key] = value;
        }
    }
    for list in ["initContainers", "containers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
            // A template's lists are not shape-checked like a pod's: validation reports them.
            for c in containers.iter_mut().filter(|c| c.is_object()) {
                if c["imagePullPolicy"].is_null() {
                    let policy = image_pull_policy(c["image"].as_str().unwrap_or_default());
                    c["imagePullPolicy"] = json!(policy);
                }
                for (key, value) in [
                    ("terminationMessagePath", json!("/dev/termination-log")),
                    ("terminationMessagePolicy", json!("File")),
                    ("resources", json!({})),
                ] {
                    if c[key].is_null() {
                        c[key] = value;
                    }
                }
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for port in ports.iter_mut().filter(|p| p.is_object()) {
                        if port["protocol"].is_null() {
                            port["protocol"] = json!("TCP");
                        }
                    }
                }
            }
        }
    }
}

fn default_pod(object: &mut Value) {
    default_pod_spec(&mut object["spec"]);
    if object["spec"]["enableServiceLinks"].is_null() {
        object["spec"]["enableServiceLinks"] = json!(true);
    }
    super::workloads::admit_service_account(object);
    let qos = qos_class(&object["spec"]);
    object["status"] = json!({"phase": "Pending", "qosClass": qos});
}

/// Fills in what the server owns on create: name from generateName, uid, creationTimestamp,
/// generation, defaults; then validates.
pub fn prepare_create(
    info: &ResourceInfo,
    object: &mut Value,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    object["kind"] = json!(info.kind);
    object["apiVersion"] = json!(info.api_version());
    if object["metadata"].is_null() {
        object["metadata"] = json!({});
    }
    let meta = &mut object["metadata"];
    let name = meta["name"].as_str().unwrap_or_default().to_string();
    if name.is_empty() {
        match meta["generateName"].as_str() {
            Some(prefix) if !prefix.is_empty() => {
                meta["name"] = json!(format!("{prefix}{}", random_suffix()))
            }
            _ => {
                return Err(ApiError::invalid(
                    info.kind,
                    "",
                    vec![Cause {
                        field: "metadata.name".into(),
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            }
        }
    }
    if let Some(map) = meta.as_object_mut() {
        for server_owned in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            map.remove(server_owned);
        }
    }
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = json!(timestamp(now));
    if info.subresources.contains(&"status") && info.plural != "namespaces" {
        meta["generation"] = json!(1);
    }
    match info.plural {
        "pods" => default_pod(object),
        "namespaces" => {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
        }
        "secrets" => {
            if object["type"].is_null() {
                object["type"] = json!("Opaque");
            }
            merge_string_data(object);
        }
        "services" | "endpoints" | "endpointslices" if !super::crd::is_custom(info) => {
            super::services::prepare_create(info.plural, object)
        }
        _ => super::workloads::prepare_create(info, object),
    }
    super::crd::prepare(info, None, object)?;
    validate(info, object)
}

/// `stringData` is write-only: merged into `data` as base64.
fn merge_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(string_data) = object.as_object_mut().and_then(|m| m.remove("stringData")) else {
        return;
    };
    if object["data"].is_null() {
        object["data"] = json!({});
    }
    // A `data` that is not a map is refused by validation; indexing into it would panic.
    let (Some(map), Some(data)) = (string_data.as_object(), object["data"].as_object_mut()) else {
        return;
    };
    for (k, v) in map {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or_default());
        data.insert(k.clone(), json!(encoded));
    }
}

/// Sets condition `kind` in `status.conditions`, keeping `lastTransitionTime` when the status
/// does not change.
pub fn set_condition(
    object: &mut Value,
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: OffsetDateTime,
) {
    if !object["status"]["conditions"].is_array() {
        object["status"]["conditions"] = json!([]);
    }
    let Some(conditions) = object["status"]["conditions"].as_array_mut() else {
        return;
    };
    let mut condition = json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": timestamp(now)});
    if !reason.is_empty() {
        condition["reason"] = json!(reason);
    }
    if !message.is_empty() {
        condition["message"] = json!(message);
    }
    match conditions.iter_mut().find(|c| c["type"] == kind) {
        Some(existing) => {
            if existing["status"] == status {
                condition["lastTransitionTime"] = existing["lastTransitionTime"].clone();
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

/// Pod spec fields an update may change (the apiserver's rule); everything else is immutable.
const POD_MUTABLE_SPEC: &[&str] = &[
    "activeDeadlineSeconds",
    "tolerations",
    "terminationGracePeriodSeconds",
];

fn pod_spec_change_allowed(current: &Value, new: &Value) -> bool {
    let strip = |spec: &Value| -> Value {
        let mut spec = spec.clone();
        if let Some(map) = spec.as_object_mut() {
            for field in POD_MUTABLE_SPEC {
                map.remove(*field);
            }
        }
        for list in ["containers", "initContainers"] {
            if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in containers {
                    if let Some(m) = c.as_object_mut() {
                        m.remove("image");
                    }
                }
            }
        }
        spec
    };
    strip(&current["spec"]) == strip(&new["spec"])
}

/// Applies the update rules to `new` given the stored `current`.
pub fn prepare_update(
    info: &ResourceInfo,
    subresource: Option<&str>,
    current: &Value,
    new: &mut Value,
) -> Result<(), ApiError> {
    let name = current["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if subresource == Some("status") {
        // Only status changes; everything else stays as stored.
        let status = new["status"].take();
        *new = current.clone();
        new["status"] = status;
        return super::crd::prepare_status(info, new);
    }
    new["kind"] = json!(info.kind);
    new["apiVersion"] = json!(info.api_version());
    if new["metadata"].is_null() {
        new["metadata"] = json!({});
    }
    for immutable in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "name",
        "generation",
    ] {
        match current["metadata"].get(immutable) {
            Some(v) => new["metadata"][immutable] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(immutable);
                }
            }
        }
    }
    super::workloads::default(info, new);
    if matches!(info.plural, "services" | "endpoints" | "endpointslices")
        && !super::crd::is_custom(info)
    {
        let mut causes = Vec::new();
        super::services::prepare_update(info.plural, current, new, &mut causes);
        if !causes.is_empty() {
            return Err(ApiError::invalid_in(info.group, info.kind, &name, causes));
        }
    }
    if info.subresources.contains(&"status") {
        new["status"] = current["status"].clone();
        if new["spec"] != current["spec"]
            && let Some(g) = current["metadata"]["generation"].as_i64()
        {
            new["metadata"]["generation"] = json!(g + 1);
        }
    }
    if info.plural == "pods" && !pod_spec_change_allowed(current, new) {
        return Err(ApiError::invalid(
            info.kind,
            &name,
            vec![Cause {
                field: "spec".into(),
                message: "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds`".into(),
            }],
        ));
    }
    if info.plural == "pods" && !tolerations_update_allowed(current, new) {
        return Err(ApiError::invalid(
            info.kind,
            &name,
            vec![Cause {
                field: "spec.tolerations".into(),
                message: "Forbidden: existing toleration can not be modified except its tolerationSeconds".into(),
            }],
        ));
    }
    if info.plural == "secrets" {
        merge_string_data(new);
    }
    super::workloads::prepare_update(info, current, new)?;
    super::crd::prepare(info, Some(current), new)?;
    validate(info, new)
}

fn finalizers(object: &Value) -> usize {
    object["metadata"]["finalizers"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Whether this update removed the last finalizer of an object being deleted, so the object
/// must go now.
pub fn is_finalized(current: &Value, new: &Value) -> bool {
    new["metadata"]["deletionTimestamp"].is_string()
        && finalizers(current) > 0
        && finalizers(new) == 0
}

/// The finalizer that makes the garbage collector remove the owner references to an object
/// from its dependents before the object goes (`propagationPolicy=Orphan`).
pub const ORPHAN_FINALIZER: &str = "orphan";
/// The finalizer that makes the garbage collector delete an object's dependents before the
/// object goes (`propagationPolicy=Foreground`).
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// Sets the garbage collector's finalizer for `propagation` on `object`, as kube-apiserver
/// does on delete: `Orphan` adds `orphan`, `Foreground` adds `foregroundDeletion`, each
/// removing the other, `Background` removes both; `None` leaves them as they are.
fn set_propagation_finalizer(object: &mut Value, propagation: Option<&str>) {
    let wanted = match propagation {
        None => return,
        Some("Orphan") => Some(ORPHAN_FINALIZER),
        Some("Foreground") => Some(FOREGROUND_FINALIZER),
        Some(_) => None,
    };
    let mut list: Vec<Value> = object["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.retain(|f| {
        let f = f.as_str().unwrap_or_default();
        (f != ORPHAN_FINALIZER && f != FOREGROUND_FINALIZER) || Some(f) == wanted
    });
    if let Some(wanted) = wanted
        && !list.iter().any(|f| f == wanted)
    {
        list.push(json!(wanted));
    }
    match object["metadata"].as_object_mut() {
        Some(meta) if list.is_empty() => {
            meta.remove("finalizers");
        }
        Some(meta) => {
            meta.insert("finalizers".into(), Value::Array(list));
        }
        None => {}
    }
}

/// If a delete must wait (finalizers, a running pod's grace period, a namespace's content),
/// the object as it should be stored meanwhile; `None` to delete it now. `propagation`
/// (`Orphan`, `Foreground`, `Background`; `None` keeps what an earlier delete chose) sets the
/// garbage collector's finalizer, which makes the deletion wait for `apiserver::gc`.
pub fn pending_deletion(
    info: &ResourceInfo,
    current: &Value,
    grace: Option<i64>,
    propagation: Option<&str>,
    now: OffsetDateTime,
) -> Option<Value> {
    if let Some(pending) = super::crd::pending_deletion(info, current, now) {
        return Some(pending);
    }
    let terminating = current["metadata"]["deletionTimestamp"].is_string();
    if info.plural == "namespaces" {
        let mut pending = current.clone();
        if !terminating {
            pending["metadata"]["deletionTimestamp"] = json!(timestamp(now));
        }
        pending["status"]["phase"] = json!("Terminating");
        return Some(pending);
    }
    if finalizers(current) > 0 {
        let mut pending = current.clone();
        set_propagation_finalizer(&mut pending, propagation);
        if !terminating {
            pending["metadata"]["deletionTimestamp"] = json!(timestamp(now));
            pending["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        } else if grace == Some(0) {
            // The node's confirmation (kubelet semantics): nothing to wait for but finalizers.
            pending["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        }
        return Some(pending);
    }
    let mut with_finalizer = current.clone();
    set_propagation_finalizer(&mut with_finalizer, propagation);
    if info.plural == "pods" {
        let grace = grace
            .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0);
        let bound = current["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        let finished = matches!(
            current["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        if grace > 0 && bound && !finished {
            // The node confirms the termination by deleting with grace 0 (kubelet semantics).
            let mut pending = with_finalizer;
            let shortened = current["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .is_none_or(|g| grace < g);
            if !terminating || shortened {
                pending["metadata"]["deletionTimestamp"] =
                    json!(timestamp(now + time::Duration::seconds(grace)));
                pending["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            }
            return Some(pending);
        }
    }
    if finalizers(&with_finalizer) > 0 {
        with_finalizer["metadata"]["deletionTimestamp"] = json!(timestamp(now));
        with_finalizer["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        return Some(with_finalizer);
    }
    None
}

/// Whether a terminating object whose finalizers are all gone may be removed now: anything
/// but a pod its node has not yet confirmed stopping (bound, not finished, a grace period
/// left), which goes when the node deletes it with grace 0.
pub fn may_remove(info: &ResourceInfo, object: &Value) -> bool {
    if info.plural != "pods" {
        return true;
    }
    let bound = object["spec"]["nodeName"]
        .as_str()
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        object["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    let grace = object["metadata"]["deletionGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(0);
    !bound || finished || grace == 0
}

/// How dependents of a deleted owner are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Dependents lose the owner reference and stay.
    Orphan,
    /// Dependents with no remaining owner are deleted (and so on down the chain).
    Background,
}

/// The store's key for a resource's collection.
pub fn resource_id(info: &ResourceInfo) -> ResourceId {
    ResourceId {
        group: info.group.to_string(),
        resource: info.plural.to_string(),
    }
}

fn owner_exists(store: &Store, namespace: &str, reference: &Value) -> Result<bool, StoreError> {
    let (Some(kind), Some(name), Some(uid)) = (
        reference["kind"].as_str(),
        reference["name"].as_str(),
        reference["uid"].as_str(),
    ) else {
        return Ok(false);
    };
    let custom = super::crd::stored();
    for info in resources::builtin()
        .iter()
        .chain(custom)
        .filter(|i| i.kind == kind)
    {
        let ns = if info.namespaced { namespace } else { "" };
        if let Some(owner) = store.get(&resource_id(info), ns, name)?
            && owner["metadata"]["uid"].as_str() == Some(uid)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Handles the dependents of the owner with `uid` that was just deleted.
pub fn collect_garbage(
    store: &Store,
    uid: &str,
    propagation: Propagation,
) -> Result<(), StoreError> {
    let mut queue = vec![uid.to_string()];
    while let Some(owner_uid) = queue.pop() {
        for (info, object) in dependents(store, &owner_uid)? {
            let id = resource_id(info);
            // A dependent has references: one of them names the owner.
            let refs = object["metadata"]["ownerReferences"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            let (namespace, name) = key(&object);
            let remaining: Vec<Value> = refs
                .iter()
                .filter(|r| r["uid"].as_str() != Some(owner_uid.as_str()))
                .cloned()
                .collect();
            let mut live = Vec::new();
            for r in &remaining {
                if owner_exists(store, &namespace, r)? {
                    live.push(r.clone());
                }
            }
            let expected = rv_of(&object);
            if propagation == Propagation::Background && live.is_empty() {
                tracing::info!(resource = info.plural, %namespace, %name, owner.uid = %owner_uid, "deleting a dependent whose owners are gone");
                match store.delete(&id, &namespace, &name, expected) {
                    Ok(deleted) => {
                        if let Some(u) = deleted["metadata"]["uid"].as_str() {
                            queue.push(u.to_string());
                        }
                    }
                    Err(StoreError::NotFound | StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            } else {
                let mut updated = object.clone();
                let kept = if propagation == Propagation::Orphan {
                    remaining
                } else {
                    live
                };
                match updated["metadata"].as_object_mut() {
                    Some(meta) if kept.is_empty() => {
                        meta.remove("ownerReferences");
                    }
                    Some(meta) => {
                        meta.insert("ownerReferences".into(), json!(kept));
                    }
                    None => continue,
                }
                match store.update(&id, &namespace, &name, updated, expected) {
                    Ok(_) | Err(StoreError::NotFound | StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// An object's (namespace, name); empty where missing.
pub fn key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// An object's resourceVersion as the store counts it, if it has one.
pub fn rv_of(object: &Value) -> Option<u64> {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(parse_rv)
}

/// A resourceVersion as this server writes them: decimal digits only (no sign, no spaces).
pub fn parse_rv(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Every object, built-in or custom, that names `uid` among its owners, with its resource.
/// Each object's stored text is searched for the uid before it is parsed: a uid names one
/// object, so the rest of the store (every pod, when one ReplicaSet goes) is read but not
/// parsed.
pub fn dependents(
    store: &Store,
    uid: &str,
) -> Result<Vec<(&'static ResourceInfo, Value)>, StoreError> {
    let mut found = Vec::new();
    for info in resources::builtin().iter().chain(super::crd::stored()) {
        store.scan_rows(&resource_id(info), Scan::default(), |row| {
            if let Some(object) = row.object_if(|text| text.contains(uid))? {
                let owned = object["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)));
                if owned {
                    found.push((info, object));
                }
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
    }
    Ok(found)
}

/// Deletes every object in a terminating namespace, then the namespace.
pub fn empty_namespace(store: &Store, namespace: &str) -> Result<(), StoreError> {
    let custom = super::crd::stored();
    for info in resources::builtin()
        .iter()
        .chain(custom)
        .filter(|i| i.namespaced)
    {
        let id = resource_id(info);
        let (objects, _) = store.list(&id, Some(namespace))?;
        for object in objects {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            match store.delete(&id, namespace, name, None) {
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
    }
    match store.delete(&resource_id(namespace_info()), "", namespace, None) {
        Ok(_) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
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

    #[test]
    fn volume_item_paths_must_stay_inside_the_volume() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {
        "containers": [{"name": "c", "image": "busybox"}],
        "volumes": [
            {"name": "v", "configMap": {"name": "x", "items": [
                {"key": "a", "path": "../etc"}, {"key": "b", "path": "/abs"},
                {"key": "c", "path": "a/../../b"}, {"key": "d", "path": "..data"},
                {"key": "e", "path": ""}, {"key": "f", "path": "ok/file..txt"}]}},
            {"name": "s", "secret": {"secretName": "x", "items": [{"key": "a", "path": ".."}]}},
            {"name": "pr", "projected": {"sources": [
                {"configMap": {"name": "x", "items": [{"key": "a", "path": "x/../y"}]}},
                {"serviceAccountToken": {"path": "/token"}}]}},
        ]}});
        let e = validate(info("pods"), &pod).expect_err("invalid");
        let causes: Vec<(String, String)> = e
            .causes()
            .iter()
            .map(|c| (c.field.clone(), c.message.clone()))
            .collect();
        let want = [
            (
                "spec.volumes[0].configMap.items[0].path",
                "Invalid value: \"../etc\": must not contain '..'",
            ),
            (
                "spec.volumes[0].configMap.items[1].path",
                "Invalid value: \"/abs\": must be a relative path",
            ),
            (
                "spec.volumes[0].configMap.items[2].path",
                "Invalid value: \"a/../../b\": must not contain '..'",
            ),
            (
                "spec.volumes[0].configMap.items[3].path",
                "Invalid value: \"..data\": must not start with '..'",
            ),
            ("spec.volumes[0].configMap.items[4].path", "Required value"),
            (
                "spec.volumes[1].secret.items[0].path",
                "Invalid value: \"..\": must not contain '..'",
            ),
            (
                "spec.volumes[1].secret.items[0].path",
                "Invalid value: \"..\": must not start with '..'",
            ),
            (
                "spec.volumes[2].projected.sources[0].configMap.items[0].path",
                "Invalid value: \"x/../y\": must not contain '..'",
            ),
            (
                "spec.volumes[2].projected.sources[1].serviceAccountToken.path",
                "Invalid value: \"/token\": must be a relative path",
            ),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(f, m)| (f.to_string(), m.to_string()))
            .collect();
        assert_eq!(causes, want);
    }

    #[test]
    fn a_configmap_key_may_not_be_in_data_and_binary_data() {
        let cm = json!({"metadata": {"name": "both"}, "data": {"a": "x", "c": "y"}, "binaryData": {"a": "eA==", "b": "eA=="}});
        let e = validate(info("configmaps"), &cm).expect_err("duplicate");
        assert_eq!(e.code, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            e.causes(),
            [Cause {
                field: "data[a]".into(),
                message: "Invalid value: \"a\": duplicate of key present in binaryData".into()
            }]
        );
    }

    #[test]
    fn immortal_namespaces_cannot_be_deleted() {
        for name in IMMORTAL_NAMESPACES {
            let e = check_deletable(namespace_info(), name).expect_err(name);
            assert_eq!(e.code, axum::http::StatusCode::FORBIDDEN);
            assert_eq!(
                e.message,
                format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted")
            );
        }
        assert!(check_deletable(namespace_info(), "kube-node-lease").is_ok());
        assert!(check_deletable(info("configmaps"), "default").is_ok());
    }

    #[test]
    fn create_fills_server_fields_and_defaults() {
        let mut pod = json!({"metadata": {"generateName": "web-"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        prepare_create(info("pods"), &mut pod, OffsetDateTime::UNIX_EPOCH).expect("valid");
        let name = pod["metadata"]["name"].as_str().expect("name");
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        assert_eq!(pod["metadata"]["creationTimestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(pod["metadata"]["uid"].as_str().map(str::len), Some(36));
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["status"]["qosClass"], "BestEffort");
        assert_eq!(pod["kind"], "Pod");
    }

    #[test]
    fn invalid_objects_list_their_causes() {
        let mut pod = json!({"metadata": {"name": "Bad_Name", "labels": {"ok": "x y"}}, "spec": {"containers": []}});
        let e = prepare_create(info("pods"), &mut pod, OffsetDateTime::UNIX_EPOCH)
            .expect_err("invalid");
        let fields: Vec<&str> = e.causes().iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            ["metadata.name", "metadata.labels", "spec.containers"]
        );
        let mut nameless = json!({"metadata": {}});
        let e = prepare_create(
            info("configmaps"),
            &mut nameless,
            OffsetDateTime::UNIX_EPOCH,
        )
        .expect_err("nameless");
        assert!(
            e.message.contains("name or generateName is required"),
            "{}",
            e.message
        );
    }

    #[test]
    fn secrets_take_string_data_and_check_base64() {
        let mut secret = json!({"metadata": {"name": "s"}, "stringData": {"password": "hunter2"}});
        prepare_create(info("secrets"), &mut secret, OffsetDateTime::UNIX_EPOCH).expect("valid");
        assert_eq!(secret["data"]["password"], "aHVudGVyMg==");
        assert!(secret.get("stringData").is_none());
        assert_eq!(secret["type"], "Opaque");
        let mut bad = json!({"metadata": {"name": "s"}, "data": {"k": "not base64!"}});
        assert!(prepare_create(info("secrets"), &mut bad, OffsetDateTime::UNIX_EPOCH).is_err());
    }

    /// Found by the `api_request` fuzz target: `stringData` with a `data` that is not a map
    /// panicked while merging (docs/fuzzing.md).
    #[test]
    fn string_data_beside_a_data_that_is_not_a_map_is_invalid_not_a_panic() {
        for plural in ["secrets", "configmaps"] {
            let mut object = json!({"metadata": {"name": "s"}, "data": "Opaque", "stringData": {"user": "admin"}});
            let error = prepare_create(info(plural), &mut object, OffsetDateTime::UNIX_EPOCH)
                .expect_err("data that is not a map");
            assert_eq!(error.causes()[0].field, "data", "{plural}: {error:?}");
            let current = json!({"metadata": {"name": "s"}, "data": {}});
            let mut update =
                json!({"metadata": {"name": "s"}, "data": ["x"], "stringData": {"user": "admin"}});
            let error = prepare_update(info(plural), None, &current, &mut update)
                .expect_err("data that is not a map");
            assert_eq!(error.causes()[0].field, "data", "{plural}: {error:?}");
        }
    }

    /// Found by the `api_request` fuzz target: a pod whose `spec` was a string (or whose
    /// containers were not objects) panicked in defaulting and in the update rules.
    #[test]
    fn fields_of_the_wrong_json_type_are_refused_before_they_are_indexed() {
        let pods = info("pods");
        for (object, field) in [
            (json!({"metadata": {"name": "p"}, "spec": "Pod"}), "spec"),
            (json!({"metadata": {"name": "p"}, "status": 1}), "status"),
            (
                json!({"metadata": {"name": "p"}, "spec": {"containers": [1]}}),
                "spec.containers",
            ),
            (
                json!({"metadata": {"name": "p"}, "spec": {"initContainers": "c"}}),
                "spec.initContainers",
            ),
            (
                json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": [[]]}}),
                "spec.tolerations",
            ),
        ] {
            let error = check_type(pods, &object).expect_err("wrong type");
            assert!(
                error.message.contains(&format!("Pod {field} must be")),
                "{field}: {error:?}"
            );
        }
        let configmap = json!({"metadata": {"name": "c"}, "spec": {"containers": "not checked"}});
        check_type(info("configmaps"), &configmap).expect("only pods have containers");
    }

    #[test]
    fn updates_keep_status_and_immutable_metadata() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}});
        prepare_create(info("pods"), &mut pod, OffsetDateTime::UNIX_EPOCH).expect("valid");
        let mut new = pod.clone();
        new["status"] = json!({"phase": "Running"});
        new["metadata"]["uid"] = json!("forged");
        new["metadata"]["labels"] = json!({"a": "b"});
        prepare_update(info("pods"), None, &pod, &mut new).expect("valid");
        assert_eq!(
            new["status"]["phase"], "Pending",
            "status ignored on the main resource"
        );
        assert_eq!(new["metadata"]["uid"], pod["metadata"]["uid"]);
        assert_eq!(new["metadata"]["labels"]["a"], "b");

        let mut status =
            json!({"status": {"phase": "Running"}, "metadata": {"labels": {"x": "y"}}});
        prepare_update(info("pods"), Some("status"), &pod, &mut status).expect("valid");
        assert_eq!(status["status"]["phase"], "Running");
        assert!(
            status["metadata"]["labels"].is_null(),
            "metadata ignored on the status subresource"
        );

        let mut changed = pod.clone();
        changed["spec"]["containers"][0]["command"] = json!(["sh"]);
        assert!(
            prepare_update(info("pods"), None, &pod, &mut changed).is_err(),
            "pod spec is immutable"
        );
        let mut image = pod.clone();
        image["spec"]["containers"][0]["image"] = json!("busybox:2");
        assert!(
            prepare_update(info("pods"), None, &pod, &mut image).is_ok(),
            "image may change"
        );
    }

    #[test]
    fn tolerations_may_only_be_added_or_change_their_seconds() {
        let unreachable = json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300});
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "busybox:1"}],
            "tolerations": [unreachable, {"key": "gpu", "operator": "Exists", "value": ""}],
        }});
        prepare_create(info("pods"), &mut pod, OffsetDateTime::UNIX_EPOCH).expect("valid");
        let update = |tolerations: Value| {
            let mut new = pod.clone();
            new["spec"]["tolerations"] = tolerations;
            prepare_update(info("pods"), None, &pod, &mut new).map(|_| ())
        };
        let forever = json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"});
        let gpu = json!({"key": "gpu", "operator": "Exists"});
        let added = json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5});
        assert!(
            update(json!([forever.clone(), gpu.clone()])).is_ok(),
            "seconds removed"
        );
        assert!(
            update(json!([gpu.clone(), added.clone(), {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}])).is_ok(),
            "seconds changed, order changed, one added"
        );
        let removed = update(json!([forever.clone()])).expect_err("removal is forbidden");
        assert!(
            removed
                .message
                .contains("existing toleration can not be modified"),
            "{}",
            removed.message
        );
        assert!(
            update(json!([{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoSchedule"}, gpu.clone()])).is_err(),
            "the effect may not change"
        );
        assert!(
            update(
                json!([forever, gpu, {"key": "x", "operator": "Exists", "tolerationSeconds": 5}])
            )
            .is_err(),
            "tolerationSeconds needs NoExecute"
        );
        for bad in [
            json!({"operator": "Equal", "value": "v"}),
            json!({"key": "k", "operator": "Exists", "value": "v"}),
            json!({"key": "k", "operator": "Near"}),
            json!({"key": "k", "operator": "Exists", "effect": "Sometimes"}),
        ] {
            let mut pod = json!({"metadata": {"name": "p"}, "spec": {
                "containers": [{"name": "c", "image": "busybox:1"}], "tolerations": [bad.clone()]}});
            assert!(
                prepare_create(info("pods"), &mut pod, OffsetDateTime::UNIX_EPOCH).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn deletion_waits_for_finalizers_and_running_pods() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let cm = json!({"metadata": {"name": "c", "finalizers": ["x"]}});
        let pending = pending_deletion(info("configmaps"), &cm, None, None, now).expect("waits");
        assert!(pending["metadata"]["deletionTimestamp"].is_string());
        assert!(
            pending_deletion(
                info("configmaps"),
                &json!({"metadata": {"name": "c"}}),
                None,
                None,
                now
            )
            .is_none()
        );

        let bound = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "gw-1", "terminationGracePeriodSeconds": 10}, "status": {"phase": "Running"}});
        let pending = pending_deletion(info("pods"), &bound, None, None, now).expect("graceful");
        assert_eq!(pending["metadata"]["deletionGracePeriodSeconds"], 10);
        assert_eq!(
            pending["metadata"]["deletionTimestamp"],
            "1970-01-01T00:00:10Z"
        );
        assert!(
            pending_deletion(info("pods"), &bound, Some(0), None, now).is_none(),
            "force delete"
        );
        let unbound =
            json!({"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}});
        assert!(pending_deletion(info("pods"), &unbound, None, None, now).is_none());

        let mut removed = pending.clone();
        removed["metadata"]["finalizers"] = json!([]);
        assert!(
            !is_finalized(&pending, &removed),
            "no finalizers were there to remove"
        );
        let with = json!({"metadata": {"finalizers": ["x"], "deletionTimestamp": "t"}});
        let without = json!({"metadata": {"finalizers": [], "deletionTimestamp": "t"}});
        assert!(is_finalized(&with, &without));
    }

    #[test]
    fn pull_policy_follows_the_tag() {
        assert_eq!(image_pull_policy("busybox"), "Always");
        assert_eq!(image_pull_policy("busybox:latest"), "Always");
        assert_eq!(image_pull_policy("localhost:5000/busybox"), "Always");
        assert_eq!(
            image_pull_policy("localhost:5000/busybox:1.36"),
            "IfNotPresent"
        );
        assert_eq!(image_pull_policy("busybox@sha256:abc"), "IfNotPresent");
    }
}
