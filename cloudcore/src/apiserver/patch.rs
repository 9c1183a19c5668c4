//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and the strategic merge patch
//! that `kubectl apply`, `kubectl edit` and `kubectl patch` send for built-in kinds.
//!
//! Strategic merge patch is a merge patch whose lists can merge element by element. Which lists
//! do is the patch metadata of the type (Kubernetes' `patchStrategy`/`patchMergeKey` struct tags),
//! kept here as a small table per kind: lists merged by a key (containers by `name`, conditions by
//! `type`, ...) and lists of primitives merged as a set (`metadata.finalizers`). Every other list
//! is replaced whole; objects merge recursively and `null` deletes a key. A kind without a table
//! (a custom resource) is refused, as Kubernetes refuses it, and its clients use merge patch.
//!
//! The directives, all removed from the result:
//! - `$patch: replace` in an object replaces the object; as a list element, replaces the list.
//! - `$patch: delete` in an object deletes it; as an element of a keyed list, deletes the elements
//!   with that key.
//! - `$retainKeys: [..]` clears the fields of the live object that are not listed.
//! - `$deleteFromPrimitiveList/<field>: [..]` removes those values from a primitive list.
//! - `$setElementOrder/<field>: [..]` orders a list (elements by merge key, primitives by value).
//!   It never adds elements: entries that match nothing are ignored.
//!
//! Unknown `$` keys are ignored, as Kubernetes promises old servers do with newer directives.
//!
//! Element order follows the API server. The elements the patch names (those of the patch list,
//! or of `$setElementOrder` when present) take the patch's order; the others keep their live
//! order and stay in front of a named element they preceded. So a patched element stays where it
//! was, `kubectl apply` (which always sends `$setElementOrder` with list changes) gets its file's
//! order, and a new element in a patch without `$setElementOrder` goes first, as in Kubernetes.

use serde_json::{Map, Value};

/// The patch content types the API accepts (from the `Content-Type` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`: a list of RFC 6902 operations.
    Json,
    /// `application/merge-patch+json`: an RFC 7386 merge patch.
    Merge,
    /// `application/strategic-merge-patch+json`: Kubernetes' strategic merge patch.
    StrategicMerge,
    /// `application/apply-patch+yaml`: server-side apply, served by `apiserver::apply` (not a
    /// patch this module applies).
    Apply,
}

impl PatchType {
    /// The patch type of a `Content-Type` value (case and parameters such as `charset` ignored),
    /// or `None` when it is not a patch media type.
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let media_type = ct
            .split(';')
            .next()
            .map_or("", str::trim)
            .to_ascii_lowercase();
        match media_type.as_str() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Why a patch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The body is not valid JSON or not the shape its patch type requires (HTTP 400).
    #[error("malformed patch: {0}")]
    Malformed(String),
    /// The patch is well formed but cannot be applied to this object, e.g. a failed JSON patch
    /// `test` or a missing path (HTTP 422).
    #[error("patch cannot be applied: {0}")]
    Failed(String),
    /// The patch type is not supported, or not for this kind (HTTP 415).
    #[error("unsupported patch: {0}")]
    Unsupported(String),
}

/// Applies a patch of `patch_type` to `original`, an object of `kind` ("Pod", "Node",
/// "ConfigMap", "Secret", "Namespace", "Event", "Lease", or any other kind, e.g. a custom
/// resource), and returns the patched object; `original` is left as it was.
///
/// Strategic merge for a kind without patch metadata (custom resources) is refused like
/// Kubernetes does ([`PatchError::Unsupported`]); callers use merge patch instead.
pub fn apply(
    patch_type: PatchType,
    kind: &str,
    original: &Value,
    patch: &[u8],
) -> Result<Value, PatchError> {
    match patch_type {
        PatchType::Json => apply_json_patch(original, patch),
        PatchType::Merge => apply_merge_patch(original, patch),
        PatchType::StrategicMerge => apply_strategic_merge_patch(kind, original, patch),
        PatchType::Apply => Err(PatchError::Unsupported(
            "server-side apply (application/apply-patch+yaml) is not a patch of this module, apiserver::apply serves it".into(),
        )),
    }
}

fn parse(body: &[u8]) -> Result<Value, PatchError> {
    serde_json::from_slice(body)
        .map_err(|e| PatchError::Malformed(format!("the body is not valid JSON: {e}")))
}

fn apply_json_patch(original: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let operations: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
        PatchError::Malformed(format!(
            "the body is not a list of JSON patch operations: {e}"
        ))
    })?;
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &operations).map_err(|e| PatchError::Failed(e.to_string()))?;
    if !patched.is_object() {
        return Err(PatchError::Failed(
            "the patched document is not a JSON object".into(),
        ));
    }
    Ok(patched)
}

fn apply_merge_patch(original: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let patch = parse(body)?;
    if !patch.is_object() {
        return Err(PatchError::Malformed(
            "a merge patch must be a JSON object".into(),
        ));
    }
    let mut patched = original.clone();
    json_patch::merge(&mut patched, &patch);
    Ok(patched)
}

fn apply_strategic_merge_patch(
    kind: &str,
    original: &Value,
    body: &[u8],
) -> Result<Value, PatchError> {
    let schema = schema_for(kind).ok_or_else(|| {
        PatchError::Unsupported(format!(
            "strategic merge patch is not supported for {kind}, use a merge patch (application/merge-patch+json)"
        ))
    })?;
    let Value::Object(patch) = parse(body)? else {
        return Err(PatchError::Malformed(
            "a strategic merge patch must be a JSON object".into(),
        ));
    };
    let live = original.as_object().cloned().unwrap_or_default();
    match merge_object(live, patch, schema)? {
        Some(patched) => Ok(Value::Object(patched)),
        None => Err(PatchError::Failed(
            "the patch deletes the whole object, use DELETE".into(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Patch metadata: the fields of built-in kinds whose patching is not the default.
// ---------------------------------------------------------------------------------------------

/// The fields of an object type that do not follow the default (objects merge, lists are
/// replaced), by JSON name. Transcribed from the `patchStrategy`/`patchMergeKey` tags of the
/// Kubernetes API types; `listType=atomic` and untagged lists are simply absent.
type Schema = &'static [(&'static str, Strategy)];

/// How one field merges.
#[derive(Debug, Clone, Copy)]
enum Strategy {
    /// An object whose own fields have metadata.
    Object(Schema),
    /// `patchStrategy:"merge" patchMergeKey:"<key>"`: a list of objects merged by `key`.
    ByKey { key: &'static str, element: Schema },
    /// `patchStrategy:"merge"` on a list of primitives: a set.
    Set,
}

const NONE: Schema = &[];

/// `patchStrategy:"merge" patchMergeKey:"<key>"` on a list whose elements have `element`'s fields.
const fn by_key(key: &'static str, element: Schema) -> Strategy {
    Strategy::ByKey { key, element }
}

/// `metav1.ObjectMeta`, shared by every kind.
const OBJECT_META: Schema = &[
    ("ownerReferences", by_key("uid", NONE)),
    ("finalizers", Strategy::Set),
];

/// `Container` and `EphemeralContainer` (their fields are the same).
const CONTAINER: Schema = &[
    ("ports", by_key("containerPort", NONE)),
    ("env", by_key("name", NONE)),
    ("volumeMounts", by_key("mountPath", NONE)),
    ("volumeDevices", by_key("devicePath", NONE)),
];

const POD_SPEC: Schema = &[
    // Tagged `merge,retainKeys`: the client sends `$retainKeys` in each volume, and it applies
    // wherever it appears.
    ("volumes", by_key("name", NONE)),
    ("initContainers", by_key("name", CONTAINER)),
    ("containers", by_key("name", CONTAINER)),
    ("ephemeralContainers", by_key("name", CONTAINER)),
    ("imagePullSecrets", by_key("name", NONE)),
    ("hostAliases", by_key("ip", NONE)),
    ("topologySpreadConstraints", by_key("topologyKey", NONE)),
    ("schedulingGates", by_key("name", NONE)),
    ("resourceClaims", by_key("name", NONE)),
];

const POD_STATUS: Schema = &[
    ("conditions", by_key("type", NONE)),
    ("podIPs", by_key("ip", NONE)),
    // `listType=atomic` for server-side apply, but tagged merge-by-ip for strategic merge.
    ("hostIPs", by_key("ip", NONE)),
    ("resourceClaimStatuses", by_key("name", NONE)),
];

const POD: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    ("spec", Strategy::Object(POD_SPEC)),
    ("status", Strategy::Object(POD_STATUS)),
];

/// `taints` is atomic.
const NODE_SPEC: Schema = &[("podCIDRs", Strategy::Set)];

const NODE_STATUS: Schema = &[
    ("conditions", by_key("type", NONE)),
    // Kubernetes documents this key as not unique enough, but it is the tag.
    ("addresses", by_key("type", NONE)),
];

const NODE: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    ("spec", Strategy::Object(NODE_SPEC)),
    ("status", Strategy::Object(NODE_STATUS)),
];

/// `spec.finalizers` is atomic.
const NAMESPACE: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    (
        "status",
        Strategy::Object(&[("conditions", by_key("type", NONE))]),
    ),
];

/// ConfigMap, Secret, Event (core and events.k8s.io), Lease, ControllerRevision and
/// autoscaling/v1 Scale have no merging lists of their own.
const METADATA_ONLY: Schema = &[("metadata", Strategy::Object(OBJECT_META))];

/// `PodTemplateSpec`, inside every workload.
const POD_TEMPLATE: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    ("spec", Strategy::Object(POD_SPEC)),
];

/// The status of apps/v1 and batch/v1 kinds: conditions merge by type.
const CONDITIONS_STATUS: Schema = &[("conditions", by_key("type", NONE))];

/// Deployment, ReplicaSet and DaemonSet: the pod template in `spec.template`.
const TEMPLATED: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    (
        "spec",
        Strategy::Object(&[("template", Strategy::Object(POD_TEMPLATE))]),
    ),
    ("status", Strategy::Object(CONDITIONS_STATUS)),
];

/// `volumeClaimTemplates` is atomic; the PVC templates' own lists are not merged.
const STATEFUL_SET: Schema = TEMPLATED;

const JOB_SPEC: Schema = &[("template", Strategy::Object(POD_TEMPLATE))];

const JOB: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    ("spec", Strategy::Object(JOB_SPEC)),
    ("status", Strategy::Object(CONDITIONS_STATUS)),
];

/// `status.active` (object references) is atomic.
const CRON_JOB: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    (
        "spec",
        Strategy::Object(&[(
            "jobTemplate",
            Strategy::Object(&[
                ("metadata", Strategy::Object(OBJECT_META)),
                ("spec", Strategy::Object(JOB_SPEC)),
            ]),
        )]),
    ),
];

/// `secrets` merges by name; `imagePullSecrets` is atomic.
const SERVICE_ACCOUNT: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    ("secrets", by_key("name", NONE)),
];

/// `spec.ports` merge by `port`; `status.conditions` by type (load-balancer ingress is atomic).
const SERVICE: Schema = &[
    ("metadata", Strategy::Object(OBJECT_META)),
    ("spec", Strategy::Object(&[("ports", by_key("port", NONE))])),
    ("status", Strategy::Object(CONDITIONS_STATUS)),
];

fn schema_for(kind: &str) -> Option<Schema> {
    match kind {
        "Pod" => Some(POD),
        "Node" => Some(NODE),
        "Namespace" => Some(NAMESPACE),
        "ConfigMap" | "Secret" | "Event" | "Lease" | "ControllerRevision" | "Scale" => {
            Some(METADATA_ONLY)
        }
        "Deployment" | "ReplicaSet" | "DaemonSet" => Some(TEMPLATED),
        "StatefulSet" => Some(STATEFUL_SET),
        "Job" => Some(JOB),
        "CronJob" => Some(CRON_JOB),
        "ServiceAccount" => Some(SERVICE_ACCOUNT),
        "Service" => Some(SERVICE),
        // Endpoints' subsets and an EndpointSlice's endpoints and ports are atomic.
        "Endpoints" | "EndpointSlice" => Some(METADATA_ONLY),
        _ => None,
    }
}

fn field_strategy(schema: Schema, name: &str) -> Option<Strategy> {
    schema
        .iter()
        .find(|(field, _)| *field == name)
        .map(|(_, strategy)| *strategy)
}

fn object_schema(schema: Schema, name: &str) -> Schema {
    match field_strategy(schema, name) {
        Some(Strategy::Object(fields)) => fields,
        _ => NONE,
    }
}

/// How a list field of a built-in kind merges, as its patch metadata says (server-side apply
/// reads the same table, `apiserver::apply`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListMerge {
    /// Untagged: the list is replaced whole.
    Replace,
    /// Elements merged by this field.
    ByKey(&'static str),
    /// A list of primitives merged as a set.
    Set,
}

/// How the list at `path` (field names from the object's root; list elements are crossed
/// implicitly, e.g. `["spec", "containers", "env"]`) of `kind` merges, or `None` when `kind`
/// has no patch metadata here (custom resources).
pub fn list_merge(kind: &str, path: &[&str]) -> Option<ListMerge> {
    let mut schema = schema_for(kind)?;
    let Some((last, parents)) = path.split_last() else {
        return Some(ListMerge::Replace);
    };
    for name in parents {
        schema = match field_strategy(schema, name) {
            Some(Strategy::Object(fields)) => fields,
            Some(Strategy::ByKey { element, .. }) => element,
            Some(Strategy::Set) | None => NONE,
        };
    }
    Some(match ListStrategy::of(schema, last) {
        ListStrategy::Replace => ListMerge::Replace,
        ListStrategy::ByKey { key, .. } => ListMerge::ByKey(key),
        ListStrategy::Set => ListMerge::Set,
    })
}

/// How a list field merges.
#[derive(Debug, Clone, Copy)]
enum ListStrategy {
    Replace,
    ByKey { key: &'static str, element: Schema },
    Set,
}

impl ListStrategy {
    fn of(schema: Schema, name: &str) -> ListStrategy {
        match field_strategy(schema, name) {
            Some(Strategy::ByKey { key, element }) => ListStrategy::ByKey { key, element },
            Some(Strategy::Set) => ListStrategy::Set,
            Some(Strategy::Object(_)) | None => ListStrategy::Replace,
        }
    }

    /// The field that identifies an element, `None` when the whole value does.
    fn key(self) -> Option<&'static str> {
        match self {
            ListStrategy::ByKey { key, .. } => Some(key),
            ListStrategy::Replace | ListStrategy::Set => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategic merge.
// ---------------------------------------------------------------------------------------------

const PATCH_DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList";

/// Merges `patch` into `live`. `None` means the patch deletes the object (`$patch: delete`).
fn merge_object(
    mut live: Map<String, Value>,
    mut patch: Map<String, Value>,
    schema: Schema,
) -> Result<Option<Map<String, Value>>, PatchError> {
    if let Some(directive) = patch.remove(PATCH_DIRECTIVE) {
        return match directive.as_str() {
            Some("replace") => merge_object(Map::new(), patch, schema),
            Some("delete") => Ok(None),
            _ => Err(PatchError::Malformed(format!(
                "unknown {PATCH_DIRECTIVE} value {directive} in an object"
            ))),
        };
    }
    if let Some(retained) = patch.remove(RETAIN_KEYS) {
        retain_keys(&mut live, &patch, &retained)?;
    }

    let orders: Vec<String> = patch
        .keys()
        .filter(|k| k.starts_with(SET_ELEMENT_ORDER))
        .cloned()
        .collect();
    for directive in orders {
        let order = patch.remove(&directive).unwrap_or_default();
        let field = directive_field(&directive, SET_ELEMENT_ORDER)?;
        let patch_list = patch.remove(field);
        set_element_order(
            &mut live,
            field,
            &order,
            patch_list,
            ListStrategy::of(schema, field),
        )?;
    }

    let mut deletions = Vec::new();
    for (key, value) in patch {
        if key.starts_with(DELETE_FROM_PRIMITIVE_LIST) {
            deletions.push((
                directive_field(&key, DELETE_FROM_PRIMITIVE_LIST)?.to_owned(),
                value,
            ));
            continue;
        }
        if key.starts_with('$') {
            tracing::debug!(directive = %key, "ignoring an unknown strategic merge patch directive");
            continue;
        }
        match value {
            Value::Null => {
                live.remove(&key);
            }
            Value::Object(patch_object) => {
                let base = match live.remove(&key) {
                    Some(Value::Object(object)) => object,
                    _ => Map::new(),
                };
                if let Some(merged) = merge_object(base, patch_object, object_schema(schema, &key))?
                {
                    live.insert(key, Value::Object(merged));
                }
            }
            Value::Array(patch_list) => {
                let base = match live.remove(&key) {
                    Some(Value::Array(list)) => list,
                    _ => Vec::new(),
                };
                let merged = merge_list(base, patch_list, ListStrategy::of(schema, &key))?;
                live.insert(key, Value::Array(merged));
            }
            scalar => {
                live.insert(key, scalar);
            }
        }
    }

    for (field, values) in deletions {
        let Value::Array(values) = values else {
            return Err(PatchError::Malformed(format!(
                "{DELETE_FROM_PRIMITIVE_LIST}/{field} must be a list"
            )));
        };
        if let Some(Value::Array(list)) = live.get_mut(&field) {
            list.retain(|item| !values.contains(item));
        }
    }
    Ok(Some(live))
}

/// The field a `$directive/<field>` key is about.
fn directive_field<'a>(key: &'a str, directive: &str) -> Result<&'a str, PatchError> {
    key.strip_prefix(directive)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|field| !field.is_empty())
        .ok_or_else(|| {
            PatchError::Malformed(format!("{key:?} is not of the form {directive}/<field>"))
        })
}

/// `$retainKeys`: clears the live fields not listed, after checking that the patch sets no field
/// it does not list.
fn retain_keys(
    live: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    retained: &Value,
) -> Result<(), PatchError> {
    let malformed =
        || PatchError::Malformed(format!("{RETAIN_KEYS} must be a list of field names"));
    let retained: Vec<&str> = retained
        .as_array()
        .ok_or_else(malformed)?
        .iter()
        .map(|name| name.as_str().ok_or_else(malformed))
        .collect::<Result<_, _>>()?;
    if let Some((field, _)) = patch.iter().find(|(field, value)| {
        !value.is_null() && !field.starts_with('$') && !retained.contains(&field.as_str())
    }) {
        return Err(PatchError::Malformed(format!(
            "the patch sets {field:?}, which {RETAIN_KEYS} does not list"
        )));
    }
    live.retain(|field, _| retained.contains(&field.as_str()));
    Ok(())
}

/// `$setElementOrder/<field>`: merges the field's patch list, if any, then orders the result.
fn set_element_order(
    live: &mut Map<String, Value>,
    field: &str,
    order: &Value,
    patch_list: Option<Value>,
    strategy: ListStrategy,
) -> Result<(), PatchError> {
    let Value::Array(order) = order else {
        return Err(PatchError::Malformed(format!(
            "{SET_ELEMENT_ORDER}/{field} must be a list"
        )));
    };
    let order = identities_of_order(order, strategy.key(), field)?;
    let live_list = match live.get(field) {
        Some(Value::Array(list)) => Some(list.clone()),
        _ => None,
    };
    let merged = match (patch_list, live_list.clone()) {
        (None, None) => return Ok(()),
        (None, Some(list)) => list,
        (Some(Value::Array(patch_list)), base) => {
            check_patch_order(&patch_list, &order, strategy.key(), field)?;
            merge_list(base.unwrap_or_default(), patch_list, strategy)?
        }
        (Some(_), _) => {
            return Err(PatchError::Malformed(format!(
                "{field} must be a list when {SET_ELEMENT_ORDER}/{field} is given"
            )));
        }
    };
    let live_order = identities(live_list.as_deref().unwrap_or_default(), strategy.key());
    live.insert(
        field.to_owned(),
        Value::Array(arrange(merged, &order, &live_order, strategy.key())),
    );
    Ok(())
}

/// The identities a `$setElementOrder` list names: merge-key values, or primitives.
fn identities_of_order(
    order: &[Value],
    key: Option<&str>,
    field: &str,
) -> Result<Vec<Value>, PatchError> {
    order
        .iter()
        .map(|entry| {
            identity(entry, key).cloned().ok_or_else(|| {
                PatchError::Malformed(format!(
                    "an entry of {SET_ELEMENT_ORDER}/{field} has no merge key"
                ))
            })
        })
        .collect()
}

/// The elements of a patch list (other than directives) must appear in `$setElementOrder`, in
/// the same order.
fn check_patch_order(
    patch_list: &[Value],
    order: &[Value],
    key: Option<&str>,
    field: &str,
) -> Result<(), PatchError> {
    let mut remaining = order.iter();
    for element in patch_list {
        if element.get(PATCH_DIRECTIVE).is_some() {
            continue;
        }
        let Some(id) = identity(element, key) else {
            continue;
        };
        if !remaining.any(|named| named == id) {
            return Err(PatchError::Malformed(format!(
                "the elements of {field} are not in the order of {SET_ELEMENT_ORDER}/{field}"
            )));
        }
    }
    Ok(())
}

fn merge_list(
    live: Vec<Value>,
    patch: Vec<Value>,
    strategy: ListStrategy,
) -> Result<Vec<Value>, PatchError> {
    match strategy {
        ListStrategy::Replace => replace_list(patch),
        ListStrategy::Set => merge_set(live, patch),
        ListStrategy::ByKey { key, element } => merge_by_key(live, patch, key, element),
    }
}

/// An atomic list: the patch list, with any directives inside its elements applied.
fn replace_list(patch: Vec<Value>) -> Result<Vec<Value>, PatchError> {
    let mut list = Vec::with_capacity(patch.len());
    for element in patch {
        match element {
            Value::Object(object) => {
                list.extend(merge_object(Map::new(), object, NONE)?.map(Value::Object))
            }
            Value::Array(inner) => list.push(Value::Array(replace_list(inner)?)),
            primitive => list.push(primitive),
        }
    }
    Ok(list)
}

/// A list of primitives merged as a set: live values, then new ones, without duplicates.
fn merge_set(live: Vec<Value>, patch: Vec<Value>) -> Result<Vec<Value>, PatchError> {
    if patch
        .iter()
        .any(|value| value.is_object() || value.is_array())
    {
        return Err(PatchError::Malformed(
            "a list of primitives holds an object or a list".into(),
        ));
    }
    let mut merged: Vec<Value> = Vec::with_capacity(live.len() + patch.len());
    for value in live.iter().chain(&patch) {
        if !merged.contains(value) {
            merged.push(value.clone());
        }
    }
    Ok(arrange(merged, &patch, &live, None))
}

/// A list of objects merged by `key`: `$patch: delete` elements delete, a `$patch: replace`
/// element replaces the list, other elements merge into the live element with the same key or
/// are added.
fn merge_by_key(
    mut live: Vec<Value>,
    patch: Vec<Value>,
    key: &str,
    schema: Schema,
) -> Result<Vec<Value>, PatchError> {
    let mut replace = false;
    let mut elements = Vec::with_capacity(patch.len());
    for element in patch {
        let Value::Object(mut element) = element else {
            return Err(PatchError::Malformed(format!(
                "a list merged by {key:?} holds a non-object"
            )));
        };
        let missing_key = || {
            PatchError::Malformed(format!(
                "an element of a list merged by {key:?} has no {key:?}"
            ))
        };
        match element.remove(PATCH_DIRECTIVE) {
            None => elements.push((element.get(key).cloned().ok_or_else(missing_key)?, element)),
            Some(directive) => match directive.as_str() {
                Some("delete") => {
                    let id = element.get(key).ok_or_else(missing_key)?;
                    live.retain(|item| identity(item, Some(key)) != Some(id));
                }
                // Marks the list for replacement; the element carries nothing else.
                Some("replace") => replace = true,
                _ => {
                    return Err(PatchError::Malformed(format!(
                        "unknown {PATCH_DIRECTIVE} value {directive} in a list element"
                    )));
                }
            },
        }
    }
    if replace {
        live.clear();
    }

    let order: Vec<Value> = elements.iter().map(|(id, _)| id.clone()).collect();
    let live_order = identities(&live, Some(key));
    let mut merged = live;
    for (id, element) in elements {
        match merged
            .iter()
            .position(|item| identity(item, Some(key)) == Some(&id))
        {
            Some(at) => {
                let base = match std::mem::take(&mut merged[at]) {
                    Value::Object(object) => object,
                    _ => Map::new(),
                };
                match merge_object(base, element, schema)? {
                    Some(object) => merged[at] = Value::Object(object),
                    None => {
                        merged.remove(at);
                    }
                }
            }
            None => merged.extend(merge_object(Map::new(), element, schema)?.map(Value::Object)),
        }
    }
    Ok(arrange(merged, &order, &live_order, Some(key)))
}

/// What identifies a list element: its merge-key value, or the value itself.
fn identity<'a>(element: &'a Value, key: Option<&str>) -> Option<&'a Value> {
    match key {
        Some(key) => element.as_object()?.get(key),
        None => Some(element),
    }
}

fn identities(list: &[Value], key: Option<&str>) -> Vec<Value> {
    list.iter()
        .filter_map(|element| identity(element, key).cloned())
        .collect()
}

/// Orders a merged list as the Kubernetes API server does. Elements named in `order` follow it;
/// the others keep their live order, and the two runs interleave so that an unnamed element stays
/// in front of a named one it preceded in `live`; otherwise the named element goes first.
fn arrange(merged: Vec<Value>, order: &[Value], live: &[Value], key: Option<&str>) -> Vec<Value> {
    let rank = |ids: &[Value], element: &Value| {
        identity(element, key).and_then(|id| ids.iter().position(|x| x == id))
    };
    let (mut named, unnamed): (Vec<Value>, Vec<Value>) = merged
        .into_iter()
        .partition(|element| rank(order, element).is_some());
    named.sort_by_key(|element| rank(order, element));

    let mut arranged = Vec::with_capacity(named.len() + unnamed.len());
    let mut named = named.into_iter().peekable();
    let mut unnamed = unnamed.into_iter().peekable();
    loop {
        let unnamed_first = match (unnamed.peek(), named.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(u), Some(n)) => {
                matches!((rank(live, u), rank(live, n)), (Some(u), Some(n)) if u < n)
            }
        };
        arranged.extend(if unnamed_first {
            unnamed.next()
        } else {
            named.next()
        });
    }
    arranged
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn smp(kind: &str, original: &Value, patch: &Value) -> Result<Value, PatchError> {
        apply(
            PatchType::StrategicMerge,
            kind,
            original,
            patch.to_string().as_bytes(),
        )
    }

    fn assert_no_directives(value: &Value, path: &str) {
        match value {
            Value::Object(object) => {
                for (key, value) in object {
                    assert!(!key.starts_with('$'), "directive {key} left at {path}");
                    assert_no_directives(value, &format!("{path}.{key}"));
                }
            }
            Value::Array(list) => list.iter().for_each(|v| assert_no_directives(v, path)),
            _ => {}
        }
    }

    /// A pod as stored: what `kubectl apply` created, plus server defaults and a webhook's env var.
    fn live_pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web",
                "namespace": "default",
                "uid": "9d1c1f0e-0000-4000-8000-000000000001",
                "resourceVersion": "41",
                "labels": {"app": "web", "tier": "edge"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{..old..}", "note": "x"},
                "finalizers": ["example.com/keep", "example.com/cleanup"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "rs-1", "controller": true}]
            },
            "spec": {
                "nodeName": "edge-1",
                "nodeSelector": {"node-role.kubernetes.io/edge": "", "zone": "a"},
                "securityContext": {"runAsUser": 1000},
                "tolerations": [{"key": "edge", "operator": "Exists"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [
                    {
                        "name": "app",
                        "image": "nginx:1.25",
                        "imagePullPolicy": "IfNotPresent",
                        "env": [
                            {"name": "MODE", "value": "prod"},
                            {"name": "INJECTED", "value": "by-webhook"},
                            {"name": "LOG", "value": "info"}
                        ],
                        "ports": [{"containerPort": 80, "protocol": "TCP"}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                    },
                    {"name": "sidecar", "image": "busybox:1.36", "args": ["sleep", "3600"]}
                ]
            },
            "status": {"phase": "Running"}
        })
    }

    struct Case {
        name: &'static str,
        kind: &'static str,
        original: Value,
        patch: Value,
        /// Applied to `original` to build the expected result.
        expect: fn(&mut Value),
    }

    #[test]
    fn strategic_merge_patches() {
        let node = json!({
            "kind": "Node",
            "metadata": {"name": "edge-1", "labels": {"node-role.kubernetes.io/edge": ""}},
            "spec": {"podCIDRs": ["10.0.0.0/24"], "taints": [{"key": "a", "effect": "NoSchedule"}, {"key": "b", "effect": "NoExecute"}]},
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True", "lastHeartbeatTime": "2024-01-01T00:00:00Z", "reason": "KubeletReady"},
                    {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "2024-01-01T00:00:00Z"}
                ],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}, {"type": "Hostname", "address": "edge-1"}],
                "images": [{"names": ["nginx:1.25"], "sizeBytes": 1}]
            }
        });
        let cases = [
            Case {
                name: "kubectl apply changes one env var of one container",
                kind: "Pod",
                original: live_pod(),
                patch: json!({
                    "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{..new..}"}},
                    "spec": {
                        "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                        "containers": [{
                            "$setElementOrder/env": [{"name": "MODE"}, {"name": "LOG"}],
                            "env": [{"name": "LOG", "value": "debug"}],
                            "name": "app"
                        }]
                    }
                }),
                expect: |pod| {
                    pod["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
                        json!("{..new..}");
                    pod["spec"]["containers"][0]["env"][2]["value"] = json!("debug");
                },
            },
            Case {
                name: "kubectl apply adds a container at the end",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}, {"name": "metrics"}],
                    "containers": [{"image": "prom/node-exporter", "name": "metrics", "ports": [{"containerPort": 9100}]}]
                }}),
                expect: |pod| {
                    let containers = pod["spec"]["containers"].as_array_mut().unwrap();
                    containers.push(json!({"name": "metrics", "image": "prom/node-exporter", "ports": [{"containerPort": 9100}]}));
                },
            },
            Case {
                name: "kubectl patch without $setElementOrder puts a new container first",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {"containers": [{"name": "debug", "image": "busybox"}]}}),
                expect: |pod| {
                    let containers = pod["spec"]["containers"].as_array_mut().unwrap();
                    containers.insert(0, json!({"name": "debug", "image": "busybox"}));
                },
            },
            Case {
                name: "kubectl apply removes an env var with $patch: delete",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                    "containers": [{
                        "$setElementOrder/env": [{"name": "MODE"}],
                        "env": [{"$patch": "delete", "name": "LOG"}],
                        "name": "app"
                    }]
                }}),
                expect: |pod| {
                    pod["spec"]["containers"][0]["env"]
                        .as_array_mut()
                        .unwrap()
                        .remove(2);
                },
            },
            Case {
                name: "kubectl apply reorders env and drops a finalizer",
                kind: "Pod",
                original: live_pod(),
                patch: json!({
                    "metadata": {
                        "$deleteFromPrimitiveList/finalizers": ["example.com/cleanup"],
                        "$setElementOrder/finalizers": ["example.com/keep"]
                    },
                    "spec": {
                        "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                        "containers": [{"$setElementOrder/env": [{"name": "LOG"}, {"name": "MODE"}], "name": "app"}]
                    }
                }),
                expect: |pod| {
                    pod["metadata"]["finalizers"] = json!(["example.com/keep"]);
                    // INJECTED is not named: it keeps its place in front of LOG, which it preceded.
                    pod["spec"]["containers"][0]["env"] = json!([
                        {"name": "INJECTED", "value": "by-webhook"},
                        {"name": "LOG", "value": "info"},
                        {"name": "MODE", "value": "prod"}
                    ]);
                },
            },
            Case {
                name: "kubectl apply adds an env var after a webhook's",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}],
                    "containers": [{
                        "$setElementOrder/env": [{"name": "MODE"}, {"name": "LOG"}, {"name": "COLOR"}],
                        "env": [{"name": "COLOR", "value": "blue"}],
                        "name": "app"
                    }]
                }}),
                expect: |pod| {
                    pod["spec"]["containers"][0]["env"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"name": "COLOR", "value": "blue"}));
                },
            },
            Case {
                name: "labels merge like kubectl label",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"metadata": {"labels": {"tier": "cloud", "release": "1"}}}),
                expect: |pod| {
                    pod["metadata"]["labels"] =
                        json!({"app": "web", "tier": "cloud", "release": "1"});
                },
            },
            Case {
                name: "null deletes a key",
                kind: "ConfigMap",
                original: json!({"kind": "ConfigMap", "metadata": {"name": "cfg", "annotations": {"note": "x", "keep": "y"}}, "data": {"a": "1", "b": "2"}}),
                patch: json!({"metadata": {"annotations": {"note": null}}, "data": {"a": null, "c": "3"}}),
                expect: |cm| {
                    cm["metadata"]["annotations"] = json!({"keep": "y"});
                    cm["data"] = json!({"b": "2", "c": "3"});
                },
            },
            Case {
                name: "$patch: replace replaces a map",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {"nodeSelector": {"$patch": "replace", "zone": "b"}}}),
                expect: |pod| pod["spec"]["nodeSelector"] = json!({"zone": "b"}),
            },
            Case {
                name: "$patch: delete deletes a map",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {"securityContext": {"$patch": "delete"}, "affinity": {"$patch": "delete"}}}),
                expect: |pod| {
                    pod["spec"]
                        .as_object_mut()
                        .unwrap()
                        .remove("securityContext");
                },
            },
            Case {
                name: "$patch: replace as a list element replaces the list",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {"containers": [{"name": "only", "image": "alpine"}, {"$patch": "replace"}]}}),
                expect: |pod| {
                    pod["spec"]["containers"] = json!([{"name": "only", "image": "alpine"}])
                },
            },
            Case {
                name: "$retainKeys clears the other member of a volume source",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {
                    "$setElementOrder/volumes": [{"name": "data"}],
                    "volumes": [{"$retainKeys": ["hostPath", "name"], "hostPath": {"path": "/srv"}, "name": "data"}]
                }}),
                expect: |pod| {
                    pod["spec"]["volumes"] = json!([{"name": "data", "hostPath": {"path": "/srv"}}])
                },
            },
            Case {
                name: "ownerReferences merge by uid",
                kind: "ConfigMap",
                original: json!({"metadata": {"name": "cfg", "ownerReferences": [{"uid": "a", "kind": "Pod", "name": "p"}]}}),
                patch: json!({"metadata": {
                    "$setElementOrder/ownerReferences": [{"uid": "a"}, {"uid": "b"}],
                    "ownerReferences": [{"uid": "a", "blockOwnerDeletion": true}, {"uid": "b", "kind": "Node", "name": "n"}]
                }}),
                expect: |cm| {
                    cm["metadata"]["ownerReferences"] = json!([
                        {"uid": "a", "kind": "Pod", "name": "p", "blockOwnerDeletion": true},
                        {"uid": "b", "kind": "Node", "name": "n"}
                    ]);
                },
            },
            Case {
                name: "finalizers merge as a set",
                kind: "Secret",
                original: json!({"metadata": {"name": "s", "finalizers": ["a", "b"]}}),
                patch: json!({"metadata": {"$setElementOrder/finalizers": ["a", "b", "c"], "finalizers": ["b", "c"]}}),
                expect: |s| s["metadata"]["finalizers"] = json!(["a", "b", "c"]),
            },
            Case {
                name: "atomic lists are replaced: args, tolerations",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"spec": {
                    "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "containers": [{"name": "sidecar", "args": ["sleep", "60"]}]
                }}),
                expect: |pod| {
                    pod["spec"]["tolerations"] = json!([{"key": "gpu", "operator": "Exists"}]);
                    pod["spec"]["containers"][1]["args"] = json!(["sleep", "60"]);
                },
            },
            Case {
                name: "node status merges conditions and addresses by type",
                kind: "Node",
                original: node.clone(),
                patch: json!({"status": {
                    "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "MemoryPressure"}],
                    "conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "lastHeartbeatTime": "2024-01-01T00:01:00Z"}],
                    "addresses": [{"type": "ExternalIP", "address": "192.0.2.7"}]
                }}),
                expect: |node| {
                    node["status"]["conditions"][0] = json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "lastHeartbeatTime": "2024-01-01T00:01:00Z"});
                    // Without $setElementOrder a new element goes first, as in Kubernetes.
                    node["status"]["addresses"] = json!([
                        {"type": "ExternalIP", "address": "192.0.2.7"},
                        {"type": "InternalIP", "address": "10.0.0.5"},
                        {"type": "Hostname", "address": "edge-1"}
                    ]);
                },
            },
            Case {
                name: "node taints and images are atomic, podCIDRs a set",
                kind: "Node",
                original: node,
                patch: json!({"spec": {"taints": [{"key": "c", "effect": "NoSchedule"}], "podCIDRs": ["fd00::/64"]}, "status": {"images": []}}),
                expect: |node| {
                    node["spec"]["taints"] = json!([{"key": "c", "effect": "NoSchedule"}]);
                    node["spec"]["podCIDRs"] = json!(["fd00::/64", "10.0.0.0/24"]);
                    node["status"]["images"] = json!([]);
                },
            },
            Case {
                name: "patch list order wins over live order without $setElementOrder",
                kind: "Namespace",
                original: json!({"metadata": {"name": "ns"}, "status": {"conditions": [{"type": "B"}, {"type": "C"}, {"type": "A"}]}}),
                patch: json!({"status": {"conditions": [{"type": "A", "status": "x"}, {"type": "B", "status": "y"}, {"type": "D"}]}}),
                expect: |ns| {
                    ns["status"]["conditions"] = json!([{"type": "C"}, {"type": "A", "status": "x"}, {"type": "B", "status": "y"}, {"type": "D"}]);
                },
            },
            Case {
                name: "a new container gets no directives and unknown $ keys are ignored",
                kind: "Pod",
                original: live_pod(),
                patch: json!({"$futureDirective": 1, "spec": {
                    "$setElementOrder/containers": [{"name": "app"}, {"name": "sidecar"}, {"name": "new"}],
                    "containers": [{
                        "name": "new",
                        "$setElementOrder/env": [{"name": "A"}],
                        "env": [{"name": "A", "value": "1"}, {"name": "GONE", "$patch": "delete"}],
                        "securityContext": {"$patch": "delete"}
                    }]
                }}),
                expect: |pod| {
                    pod["spec"]["containers"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"name": "new", "env": [{"name": "A", "value": "1"}]}));
                },
            },
        ];
        for case in cases {
            let mut expected = case.original.clone();
            (case.expect)(&mut expected);
            let patched = smp(case.kind, &case.original, &case.patch)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(patched, expected, "{}", case.name);
            assert_no_directives(&patched, case.name);
        }
    }

    /// The HTTP answer a rejected patch gets.
    #[derive(Debug, PartialEq)]
    enum Rejection {
        BadRequest,
        Unprocessable,
        UnsupportedMediaType,
    }

    #[test]
    fn rejected_patches() {
        use PatchType::{Apply, Json, Merge, StrategicMerge};
        use Rejection::{BadRequest, Unprocessable, UnsupportedMediaType};
        let pod = live_pod();
        let cases: [(&str, PatchType, &str, &str, Rejection); 16] = [
            (
                "smp on a custom resource",
                StrategicMerge,
                "Device",
                r#"{"spec":{}}"#,
                UnsupportedMediaType,
            ),
            (
                "server-side apply",
                Apply,
                "Pod",
                "metadata: {}",
                UnsupportedMediaType,
            ),
            (
                "smp not json",
                StrategicMerge,
                "Pod",
                "{metadata",
                BadRequest,
            ),
            (
                "smp not an object",
                StrategicMerge,
                "Pod",
                "[1]",
                BadRequest,
            ),
            (
                "merge key missing",
                StrategicMerge,
                "Pod",
                r#"{"spec":{"containers":[{"image":"x"}]}}"#,
                BadRequest,
            ),
            (
                "unknown $patch value",
                StrategicMerge,
                "Pod",
                r#"{"spec":{"$patch":"explode"}}"#,
                BadRequest,
            ),
            (
                "field outside $retainKeys",
                StrategicMerge,
                "Pod",
                r#"{"spec":{"$retainKeys":["nodeName"],"hostname":"h"}}"#,
                BadRequest,
            ),
            (
                "patch list out of $setElementOrder",
                StrategicMerge,
                "Pod",
                r#"{"spec":{"$setElementOrder/containers":[{"name":"app"},{"name":"sidecar"}],"containers":[{"name":"sidecar"},{"name":"app"}]}}"#,
                BadRequest,
            ),
            (
                "directive without a field",
                StrategicMerge,
                "Pod",
                r#"{"metadata":{"$deleteFromPrimitiveList":["a"]}}"#,
                BadRequest,
            ),
            (
                "smp deletes the object",
                StrategicMerge,
                "Pod",
                r#"{"$patch":"delete"}"#,
                Unprocessable,
            ),
            ("merge patch not json", Merge, "Device", "nope", BadRequest),
            ("merge patch not an object", Merge, "Pod", "[]", BadRequest),
            (
                "json patch not a list",
                Json,
                "Pod",
                r#"{"op":"add","path":"/a","value":1}"#,
                BadRequest,
            ),
            (
                "json patch test fails",
                Json,
                "Pod",
                r#"[{"op":"test","path":"/spec/nodeName","value":"edge-2"}]"#,
                Unprocessable,
            ),
            (
                "json patch path missing",
                Json,
                "Pod",
                r#"[{"op":"remove","path":"/spec/hostname"}]"#,
                Unprocessable,
            ),
            (
                "json patch result not an object",
                Json,
                "Pod",
                r#"[{"op":"replace","path":"","value":[1]}]"#,
                Unprocessable,
            ),
        ];
        for (name, patch_type, kind, body, expected) in cases {
            let rejection = match apply(patch_type, kind, &pod, body.as_bytes()).expect_err(name) {
                PatchError::Malformed(_) => BadRequest,
                PatchError::Failed(_) => Unprocessable,
                PatchError::Unsupported(_) => UnsupportedMediaType,
            };
            assert_eq!(rejection, expected, "{name}");
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let pod = live_pod();
        let body = br#"{"metadata":{"labels":{"tier":"cloud","app":null}},"spec":{"containers":[{"name":"only","image":"alpine"}]}}"#;
        let patched = apply(PatchType::Merge, "Pod", &pod, body).unwrap();
        assert_eq!(patched["metadata"]["labels"], json!({"tier": "cloud"}));
        assert_eq!(
            patched["spec"]["containers"],
            json!([{"name": "only", "image": "alpine"}]),
            "lists are replaced"
        );
        assert_eq!(patched["spec"]["nodeName"], "edge-1");

        let device = json!({"apiVersion": "devices.example.com/v1", "kind": "Device", "metadata": {"name": "d"}, "spec": {"a": 1}});
        let patched = apply(PatchType::Merge, "Device", &device, br#"{"spec":{"b":2}}"#).unwrap();
        assert_eq!(patched["spec"], json!({"a": 1, "b": 2}));
    }

    #[test]
    fn json_patch_follows_rfc_6902() {
        let pod = live_pod();
        let body = br#"[
            {"op": "test", "path": "/metadata/resourceVersion", "value": "41"},
            {"op": "add", "path": "/metadata/labels/app.kubernetes.io~1name", "value": "web"},
            {"op": "replace", "path": "/spec/containers/0/image", "value": "nginx:1.27"},
            {"op": "remove", "path": "/metadata/annotations/note"}
        ]"#;
        let patched = apply(PatchType::Json, "Pod", &pod, body).unwrap();
        assert_eq!(
            patched["metadata"]["labels"]["app.kubernetes.io/name"],
            "web"
        );
        assert_eq!(patched["spec"]["containers"][0]["image"], "nginx:1.27");
        assert!(patched["metadata"]["annotations"].get("note").is_none());
        assert_eq!(
            pod["spec"]["containers"][0]["image"], "nginx:1.25",
            "the original is untouched"
        );
    }

    #[test]
    fn content_types() {
        let cases = [
            ("application/json-patch+json", Some(PatchType::Json)),
            (
                "application/merge-patch+json; charset=utf-8",
                Some(PatchType::Merge),
            ),
            (
                "Application/Strategic-Merge-Patch+JSON",
                Some(PatchType::StrategicMerge),
            ),
            ("application/apply-patch+yaml", Some(PatchType::Apply)),
            ("application/json", None),
            ("", None),
        ];
        for (content_type, expected) in cases {
            assert_eq!(
                PatchType::from_content_type(content_type),
                expected,
                "{content_type}"
            );
        }
    }

    #[test]
    fn workload_templates_merge_containers_and_env_by_name() {
        let live = json!({
            "metadata": {"name": "web", "annotations": {"a": "1"}},
            "spec": {"replicas": 1, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [
                    {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "busybox"}
                ]}
            }},
            "status": {"conditions": [{"type": "Available", "status": "True"}]}
        });
        // `kubectl set image deployment/web web=nginx:2` and `kubectl set env ... B=2`.
        let patch = br#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:2","env":[{"name":"B","value":"2"}]}]}}}}"#;
        for kind in ["Deployment", "ReplicaSet", "DaemonSet", "StatefulSet"] {
            let out = apply(PatchType::StrategicMerge, kind, &live, patch).unwrap();
            let containers = &out["spec"]["template"]["spec"]["containers"];
            assert_eq!(containers[0]["image"], "nginx:2", "{kind}");
            let env = containers[0]["env"].as_array().unwrap();
            assert_eq!(env.len(), 2, "{kind}: env merges by name");
            assert!(env.contains(&json!({"name": "A", "value": "1"})), "{kind}");
            assert!(env.contains(&json!({"name": "B", "value": "2"})), "{kind}");
            assert_eq!(
                containers[1]["name"], "side",
                "{kind}: the other container stays"
            );
        }
        // A Job's and a CronJob's templates are one and two levels further in.
        let job = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}}}});
        let out = apply(
            PatchType::StrategicMerge,
            "Job",
            &job,
            br#"{"spec":{"template":{"spec":{"containers":[{"name":"b","image":"z"}]}}}}"#,
        )
        .unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["image"],
            "x"
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][1]["image"],
            "z"
        );
        let cj = json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}}}}}});
        let out = apply(
            PatchType::StrategicMerge,
            "CronJob",
            &cj,
            br#"{"spec":{"jobTemplate":{"spec":{"template":{"spec":{"containers":[{"name":"a","image":"w"}]}}}}}}"#,
        )
        .unwrap();
        let containers = &out["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            (&containers[0]["image"], &containers[1]["image"]),
            (&json!("w"), &json!("y"))
        );
        // Status conditions merge by type.
        let out = apply(
            PatchType::StrategicMerge,
            "Deployment",
            &live,
            br#"{"status":{"conditions":[{"type":"Progressing","status":"True"}]}}"#,
        )
        .unwrap();
        assert_eq!(out["status"]["conditions"].as_array().unwrap().len(), 2);
    }
}
