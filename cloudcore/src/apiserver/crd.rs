//! Custom resources: what an applied CustomResourceDefinition makes served (discovery, schema
//! validation, defaulting, pruning, subresources, printer columns), and the definitions'
//! lifecycle (names, `NamesAccepted`/`Established`, deletion of every object before the
//! definition goes).
//!
//! The registry of served custom resources is process-wide, so that [`resources::lookup`] and
//! [`resources::lookup_kind`] keep their signatures and see custom resources too. It is built
//! from the store at start ([`load`]) and kept current by [`run`], which watches the
//! definitions as kube-apiserver's naming, establishing and finalizer controllers do. A version
//! is served once its definition's names are accepted; `Established` is written only after
//! the registry has it, so `kubectl wait --for condition=established` is enough before use.
//!
//! [`ResourceInfo`] is `Copy` with `&'static` fields: the registry interns every distinct
//! string, string list and `ResourceInfo` value once ([`intern`]) and never frees them. Memory
//! is bounded by the number of distinct definitions (names, versions, scopes) seen since the
//! process started, not by the number of updates: re-applying a definition leaks nothing.
//!
//! Objects are stored once per resource (the store key has no version); with conversion
//! strategy `None` every served version reads them with its own `apiVersion` ([`present`]).

pub mod printer;
pub mod schema;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::objects;
use super::resources::{self, ResourceInfo, TableOptions};
use super::status::{ApiError, Cause};
use super::store::{EventType, ResourceId, Store, StoreError};
use printer::{JsonPath, PrinterColumn};

/// The group of CustomResourceDefinitions.
pub const GROUP: &str = "apiextensions.k8s.io";
/// The finalizer that holds a definition until its objects are gone.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";
/// Verbs of every custom resource.
const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The `scale` subresource of a version: where replicas and the selector live.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// One served version of a custom resource.
#[derive(Debug, Clone)]
pub struct Served {
    pub info: &'static ResourceInfo,
    /// The definition's name (`plural.group`).
    pub definition: String,
    /// `openAPIV3Schema` of this version.
    pub schema: Option<Value>,
    /// Printer columns, the default Age when the version declares none.
    pub columns: Vec<PrinterColumn>,
    pub scale: Option<ScalePaths>,
    /// The definition is being deleted: reads go on, creates are refused.
    pub terminating: bool,
    /// This is the storage version.
    pub storage: bool,
}

type Registry = RwLock<BTreeMap<String, Vec<Arc<Served>>>>;

/// Definition name → its served versions, in version priority order.
#[cfg(not(test))]
static REGISTRY: LazyLock<Registry> = LazyLock::new(|| RwLock::new(BTreeMap::new()));

// Unit tests run in parallel threads of one process: each gets a registry of its own, so a
// test that registers definitions never shows them to another's discovery documents.
#[cfg(test)]
thread_local! {
    static REGISTRY: &'static Registry = Box::leak(Box::new(RwLock::new(BTreeMap::new())));
}

fn registry_lock() -> &'static Registry {
    #[cfg(test)]
    return REGISTRY.with(|r| *r);
    #[cfg(not(test))]
    &REGISTRY
}

fn registry() -> std::sync::RwLockReadGuard<'static, BTreeMap<String, Vec<Arc<Served>>>> {
    registry_lock().read().unwrap_or_else(|p| p.into_inner())
}

fn registry_mut() -> std::sync::RwLockWriteGuard<'static, BTreeMap<String, Vec<Arc<Served>>>> {
    registry_lock().write().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Interning
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Interned {
    strings: HashSet<&'static str>,
    lists: HashSet<&'static [&'static str]>,
    infos: HashSet<&'static ResourceInfo>,
}

static INTERNED: LazyLock<Mutex<Interned>> = LazyLock::new(|| Mutex::new(Interned::default()));

/// The one `&'static` copy of `text`, leaked the first time it is seen.
pub fn intern(text: &str) -> &'static str {
    let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = interned.strings.get(text) {
        return s;
    }
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    interned.strings.insert(leaked);
    leaked
}

fn intern_list(items: &[String]) -> &'static [&'static str] {
    let strings: Vec<&'static str> = items.iter().map(|s| intern(s)).collect();
    let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(list) = interned.lists.get(strings.as_slice()) {
        return list;
    }
    let leaked: &'static [&'static str] = Box::leak(strings.into_boxed_slice());
    interned.lists.insert(leaked);
    leaked
}

fn intern_info(info: ResourceInfo) -> &'static ResourceInfo {
    let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = interned.infos.get(&info) {
        return existing;
    }
    let leaked: &'static ResourceInfo = Box::leak(Box::new(info));
    interned.infos.insert(leaked);
    leaked
}

// ---------------------------------------------------------------------------------------------
// Lookups (called by `resources`, `objects`, `discovery`, `verbs`)
// ---------------------------------------------------------------------------------------------

/// The served custom resource at `group`/`version` with URL name `plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    registry()
        .values()
        .flatten()
        .find(|s| s.info.group == group && s.info.version == version && s.info.plural == plural)
        .map(|s| s.info)
}

/// The served custom resource of `kind` in `group`/`version`.
pub fn lookup_kind(group: &str, version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    registry()
        .values()
        .flatten()
        .find(|s| s.info.group == group && s.info.version == version && s.info.kind == kind)
        .map(|s| s.info)
}

/// Every served version of every custom resource: by group, then version priority.
pub fn served() -> Vec<&'static ResourceInfo> {
    let mut all: Vec<&'static ResourceInfo> =
        registry().values().flatten().map(|s| s.info).collect();
    all.sort_by(|a, b| {
        a.group
            .cmp(b.group)
            .then_with(|| version_priority(a.version).cmp(&version_priority(b.version)))
            .then_with(|| a.plural.cmp(b.plural))
    });
    all
}

/// One version of each custom resource (the first served): for walks over every stored
/// object (garbage collection, namespace cleanup), which must see each collection once.
pub fn stored() -> Vec<&'static ResourceInfo> {
    registry()
        .values()
        .filter_map(|versions| versions.first().map(|s| s.info))
        .collect()
}

/// What is served for `info`, if it is a custom resource.
pub fn served_version(info: &ResourceInfo) -> Option<Arc<Served>> {
    registry()
        .values()
        .flatten()
        .find(|s| *s.info == *info)
        .cloned()
}

/// Whether `info` is a custom resource (not a built-in).
pub fn is_custom(info: &ResourceInfo) -> bool {
    served_version(info).is_some()
}

/// kube-apiserver's version order: GA before beta before alpha, higher numbers first, then
/// anything else alphabetically.
fn version_priority(version: &str) -> (u8, i64, i64, String) {
    let parsed = version.strip_prefix('v').and_then(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: i64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((0, -major, 0));
        }
        for (class, prefix) in [(1u8, "beta"), (2u8, "alpha")] {
            if let Some(n) = tail.strip_prefix(prefix)
                && let Ok(minor) = n.parse::<i64>()
            {
                return Some((class, -major, -minor));
            }
        }
        None
    });
    match parsed {
        Some((class, major, minor)) => (class, major, minor, String::new()),
        None => (3, 0, 0, version.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// The registry from definitions
// ---------------------------------------------------------------------------------------------

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn scale_paths(scale: &Value) -> Option<ScalePaths> {
    let trim = |p: &str| p.to_string();
    Some(ScalePaths {
        spec_replicas: trim(scale["specReplicasPath"].as_str()?),
        status_replicas: trim(scale["statusReplicasPath"].as_str()?),
        label_selector: scale["labelSelectorPath"].as_str().map(trim),
    })
}

/// The served versions of a definition, in version priority order.
fn served_versions(definition: &Value) -> Vec<Arc<Served>> {
    let spec = &definition["spec"];
    let names = &spec["names"];
    let kind = names["kind"].as_str().unwrap_or_default();
    let singular = names["singular"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let terminating = definition["metadata"]["deletionTimestamp"].is_string();
    let mut out: Vec<Arc<Served>> = Vec::new();
    for version in spec["versions"].as_array().into_iter().flatten() {
        if version["served"] != json!(true) {
            continue;
        }
        let Some(name) = version["name"].as_str() else {
            continue;
        };
        let mut subresources = Vec::new();
        if version["subresources"]["status"].is_object() {
            subresources.push("status".to_string());
        }
        let scale = scale_paths(&version["subresources"]["scale"]);
        if scale.is_some() {
            subresources.push("scale".to_string());
        }
        let info = intern_info(ResourceInfo {
            group: intern(spec["group"].as_str().unwrap_or_default()),
            version: intern(name),
            kind: intern(kind),
            plural: intern(names["plural"].as_str().unwrap_or_default()),
            singular: intern(&singular),
            short_names: intern_list(&strings(&names["shortNames"])),
            namespaced: spec["scope"] == "Namespaced",
            verbs: VERBS,
            subresources: intern_list(&subresources),
            categories: intern_list(&strings(&names["categories"])),
        });
        let declared: Vec<PrinterColumn> = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(PrinterColumn::from_definition)
            .collect();
        let columns = if version["additionalPrinterColumns"].is_array() {
            declared
        } else {
            vec![PrinterColumn::age()]
        };
        out.push(Arc::new(Served {
            info,
            definition: definition["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            schema: version["schema"]
                .get("openAPIV3Schema")
                .filter(|s| s.is_object())
                .cloned(),
            columns,
            scale,
            terminating,
            storage: version["storage"] == json!(true),
        }));
    }
    out.sort_by_key(|a| version_priority(a.info.version));
    out
}

/// The storage version's name of a definition.
fn storage_version(definition: &Value) -> Option<&str> {
    definition["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["storage"] == json!(true))
        .and_then(|v| v["name"].as_str())
}

/// The names a definition asks for, with the defaults kube-apiserver fills in.
struct Names {
    plural: String,
    singular: String,
    short_names: Vec<String>,
    kind: String,
    list_kind: String,
    categories: Vec<String>,
}

impl Names {
    fn of(definition: &Value) -> Names {
        let names = &definition["spec"]["names"];
        let kind = names["kind"].as_str().unwrap_or_default().to_string();
        Names {
            plural: names["plural"].as_str().unwrap_or_default().to_string(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_ascii_lowercase()),
            short_names: strings(&names["shortNames"]),
            list_kind: names["listKind"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("{kind}List")),
            kind,
            categories: strings(&names["categories"]),
        }
    }
}

/// kube-apiserver's naming controller: the names of `definition` that no other served
/// definition of the same group (nor a built-in resource) uses, and the `NamesAccepted`
/// condition's reason and message when some are taken (the last conflict found wins, as
/// there).
fn accepted_names(definition: &Value) -> (Value, Option<(&'static str, String)>) {
    let name = definition["metadata"]["name"].as_str().unwrap_or_default();
    let group = definition["spec"]["group"].as_str().unwrap_or_default();
    let wanted = Names::of(definition);
    let mut taken: HashSet<String> = HashSet::new();
    let mut taken_kinds: HashSet<String> = HashSet::new();
    for r in resources::builtin().iter().filter(|r| r.group == group) {
        taken.insert(r.plural.to_string());
        taken.insert(r.singular.to_string());
        taken.extend(r.short_names.iter().map(|s| s.to_string()));
        taken_kinds.insert(r.kind.to_string());
        taken_kinds.insert(format!("{}List", r.kind));
    }
    for (other, versions) in registry().iter() {
        if other == name {
            continue;
        }
        if let Some(s) = versions.first().filter(|s| s.info.group == group) {
            taken.insert(s.info.plural.to_string());
            taken.insert(s.info.singular.to_string());
            taken.extend(s.info.short_names.iter().map(|n| n.to_string()));
            taken_kinds.insert(s.info.kind.to_string());
            taken_kinds.insert(format!("{}List", s.info.kind));
        }
    }
    let mut accepted = serde_json::Map::new();
    let mut conflict = None;
    let in_use = |n: &str| format!("{n:?} is already in use");
    if taken.contains(&wanted.plural) {
        conflict = Some(("PluralConflict", in_use(&wanted.plural)));
    } else {
        accepted.insert("plural".into(), json!(wanted.plural));
    }
    if taken.contains(&wanted.singular) {
        conflict = Some(("SingularConflict", in_use(&wanted.singular)));
    } else {
        accepted.insert("singular".into(), json!(wanted.singular));
    }
    if let Some(short) = wanted.short_names.iter().find(|s| taken.contains(*s)) {
        conflict = Some(("ShortNamesConflict", in_use(short)));
    } else if !wanted.short_names.is_empty() {
        accepted.insert("shortNames".into(), json!(wanted.short_names));
    }
    let kind_ok = !taken_kinds.contains(&wanted.kind);
    if !kind_ok {
        conflict = Some(("KindConflict", in_use(&wanted.kind)));
    }
    if taken_kinds.contains(&wanted.list_kind) || !kind_ok {
        conflict = Some(("ListKindConflict", in_use(&wanted.list_kind)));
    } else {
        accepted.insert("kind".into(), json!(wanted.kind));
        accepted.insert("listKind".into(), json!(wanted.list_kind));
    }
    if !accepted.contains_key("kind") {
        accepted.insert("kind".into(), json!(""));
    }
    if !wanted.categories.is_empty() {
        accepted.insert("categories".into(), json!(wanted.categories));
    }
    (Value::Object(accepted), conflict)
}

/// Sets a condition of a definition's status, keeping `lastTransitionTime` when its status
/// does not change.
fn set_condition(
    status: &mut Value,
    kind: &str,
    value: &str,
    reason: &str,
    message: &str,
    now: OffsetDateTime,
) {
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let Some(conditions) = status["conditions"].as_array_mut() else {
        return;
    };
    let mut condition = json!({"type": kind, "status": value, "reason": reason, "message": message,
                               "lastTransitionTime": objects::timestamp(now)});
    match conditions.iter_mut().find(|c| c["type"] == kind) {
        Some(existing) => {
            if existing["status"] == value {
                condition["lastTransitionTime"] = existing["lastTransitionTime"].clone();
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

/// The status a definition should have given the registry: accepted names, `NamesAccepted`,
/// `Established` and the stored versions. Registers its versions when its names are accepted.
fn establish(definition: &Value, now: OffsetDateTime) -> Value {
    let name = definition["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (accepted, conflict) = accepted_names(definition);
    let mut status = definition["status"].clone();
    if !status.is_object() {
        status = json!({});
    }
    status["acceptedNames"] = accepted;
    match conflict {
        None => {
            registry_mut().insert(name, served_versions(definition));
            set_condition(
                &mut status,
                "NamesAccepted",
                "True",
                "NoConflicts",
                "no conflicts found",
                now,
            );
            let established_before = status["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            });
            if !established_before {
                set_condition(
                    &mut status,
                    "Established",
                    "True",
                    "InitialNamesAccepted",
                    "the initial names have been accepted",
                    now,
                );
            }
        }
        Some((reason, message)) => {
            registry_mut().remove(&name);
            set_condition(&mut status, "NamesAccepted", "False", reason, &message, now);
            set_condition(
                &mut status,
                "Established",
                "False",
                "NotAccepted",
                "not all names are accepted",
                now,
            );
        }
    }
    let mut stored = strings(&status["storedVersions"]);
    if let Some(storage) = storage_version(definition)
        && !stored.iter().any(|s| s == storage)
    {
        stored.push(storage.to_string());
    }
    status["storedVersions"] = json!(stored);
    status
}

// ---------------------------------------------------------------------------------------------
// The definitions controller
// ---------------------------------------------------------------------------------------------

fn definitions_id() -> ResourceId {
    ResourceId {
        group: GROUP.into(),
        resource: "customresourcedefinitions".into(),
    }
}

/// Builds the registry from the definitions in the store (before the API serves requests).
pub fn load(store: &Store) -> Result<u64, StoreError> {
    let (definitions, rv) = store.list(&definitions_id(), None)?;
    // Established definitions first, so that a definition that lost a conflict does not take
    // the names of one that was serving before the restart.
    let (established, others): (Vec<Value>, Vec<Value>) = definitions.into_iter().partition(|d| {
        d["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
    });
    for definition in established.iter().chain(others.iter()) {
        reconcile(store, definition)?;
    }
    Ok(rv)
}

/// One definition as it is now: establishes it, or finishes its deletion.
fn reconcile(store: &Store, definition: &Value) -> Result<(), StoreError> {
    let name = definition["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let now = OffsetDateTime::now_utc();
    if definition["metadata"]["deletionTimestamp"].is_string() {
        return finalize(store, definition, &name, now);
    }
    let status = establish(definition, now);
    if status != definition["status"] {
        let mut updated = definition.clone();
        updated["status"] = status;
        let expected = definition["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok());
        match store.update(&definitions_id(), "", &name, updated, expected) {
            // A newer write comes as its own event and is reconciled then.
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A definition being deleted: every object of it is deleted, then the cleanup finalizer is
/// removed and, with no finalizer left, the definition itself.
fn finalize(
    store: &Store,
    definition: &Value,
    name: &str,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let versions = served_versions(definition);
    if versions.is_empty() {
        registry_mut().remove(name);
    } else {
        registry_mut().insert(name.to_string(), versions.clone());
    }
    let has_finalizer = definition["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == CLEANUP_FINALIZER));
    if !has_finalizer {
        return Ok(());
    }
    let group = definition["spec"]["group"].as_str().unwrap_or_default();
    let plural = definition["spec"]["names"]["plural"]
        .as_str()
        .unwrap_or_default();
    let id = ResourceId {
        group: group.into(),
        resource: plural.into(),
    };
    let (objects, _) = store.list(&id, None)?;
    let count = objects.len();
    for object in objects {
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let object_name = object["metadata"]["name"].as_str().unwrap_or_default();
        match store.delete(&id, namespace, object_name, None) {
            Ok(_) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    tracing::info!(
        definition = name,
        objects = count,
        "custom resources of a deleted definition removed"
    );
    registry_mut().remove(name);
    let mut finalized = definition.clone();
    set_condition(
        &mut finalized["status"],
        "Terminating",
        "True",
        "InstanceDeletionCompleted",
        "removed all instances",
        now,
    );
    if let Some(list) = finalized["metadata"]["finalizers"].as_array_mut() {
        list.retain(|f| f != CLEANUP_FINALIZER);
    }
    let expected = definition["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok());
    let result = if finalized["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        store
            .delete(&definitions_id(), "", name, expected)
            .map(|_| ())
    } else {
        store
            .update(&definitions_id(), "", name, finalized, expected)
            .map(|_| ())
    };
    match result {
        Ok(()) | Err(StoreError::Conflict { .. } | StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The definitions controller: reconciles every definition change from `from` on, until
/// cancelled. A lost watch (compaction) reloads from a fresh list.
pub async fn run(store: Store, mut from: u64, shutdown: CancellationToken) {
    loop {
        let watch_store = store.clone();
        let watch =
            tokio::task::spawn_blocking(move || watch_store.watch(&definitions_id(), None, from))
                .await;
        let mut watch = match watch {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot watch custom resource definitions; relisting");
                let s = store.clone();
                match tokio::task::spawn_blocking(move || load(&s)).await {
                    Ok(Ok(rv)) => from = rv,
                    _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                }
                continue;
            }
            Err(_) => return,
        };
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = watch.next() => event,
            };
            let Some(event) = event else { break };
            from = event.rv;
            if event.event_type == EventType::Deleted {
                registry_mut().remove(&event.name);
                continue;
            }
            let s = store.clone();
            let object = event.object.clone();
            match tokio::task::spawn_blocking(move || reconcile(&s, &object)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(definition = %event.name, error = %e, "cannot reconcile a custom resource definition")
                }
                Err(e) => tracing::warn!(error = %e, "definition reconcile task failed"),
            }
        }
    }
}

/// The delete of a definition: marked with `deletionTimestamp`, the cleanup finalizer and a
/// `Terminating` condition, and left for [`run`] to finish. `None` for any other resource.
pub fn pending_deletion(
    info: &ResourceInfo,
    current: &Value,
    now: OffsetDateTime,
) -> Option<Value> {
    if info.group != GROUP || info.plural != "customresourcedefinitions" {
        return None;
    }
    let mut pending = current.clone();
    if !current["metadata"]["deletionTimestamp"].is_string() {
        pending["metadata"]["deletionTimestamp"] = json!(objects::timestamp(now));
        pending["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    }
    let finalizers = pending["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
        let mut list = finalizers;
        list.push(json!(CLEANUP_FINALIZER));
        pending["metadata"]["finalizers"] = json!(list);
    }
    if !pending["status"].is_object() {
        pending["status"] = json!({});
    }
    set_condition(
        &mut pending["status"],
        "Terminating",
        "True",
        "InstanceDeletionPending",
        "CustomResourceDefinition marked for deletion; CustomResource deletion will begin soon",
        now,
    );
    Some(pending)
}

// ---------------------------------------------------------------------------------------------
// Definition validation
// ---------------------------------------------------------------------------------------------

const SCHEMA_TYPES: &[&str] = &["array", "boolean", "integer", "number", "object", "string"];
const COLUMN_TYPES: &str = "boolean,date,integer,number,string";

fn cause(causes: &mut Vec<Cause>, field: impl Into<String>, message: impl Into<String>) {
    causes.push(Cause {
        field: field.into(),
        message: message.into(),
    });
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Defaults of a definition kube-apiserver fills in on create and update: `singular` and
/// `listKind` from `kind`, conversion `None`.
pub fn default_definition(definition: &mut Value) {
    let kind = definition["spec"]["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !definition["spec"]["names"].is_object() {
        return;
    }
    if !kind.is_empty() {
        if definition["spec"]["names"]["singular"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            definition["spec"]["names"]["singular"] = json!(kind.to_ascii_lowercase());
        }
        if definition["spec"]["names"]["listKind"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            definition["spec"]["names"]["listKind"] = json!(format!("{kind}List"));
        }
    }
    if definition["spec"]["conversion"].is_null() {
        definition["spec"]["conversion"] = json!({"strategy": "None"});
    }
}

/// Validates a CustomResourceDefinition as kube-apiserver does (the parts this server
/// serves), with its field paths and messages.
pub fn validate_definition(definition: &Value, causes: &mut Vec<Cause>) {
    let spec = &definition["spec"];
    let name = definition["metadata"]["name"].as_str().unwrap_or_default();
    let group = spec["group"].as_str().unwrap_or_default();
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default();
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        cause(
            causes,
            "metadata.name",
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        );
    }
    if group.is_empty() {
        cause(causes, "spec.group", "Required value");
    } else if !group.contains('.') {
        cause(
            causes,
            "spec.group",
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        );
    }
    match spec["scope"].as_str() {
        Some("Cluster" | "Namespaced") => {}
        None | Some("") => cause(causes, "spec.scope", "Required value"),
        Some(other) => cause(
            causes,
            "spec.scope",
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
        ),
    }
    for (field, required) in [
        ("plural", true),
        ("singular", true),
        ("kind", true),
        ("listKind", true),
    ] {
        let value = names[field].as_str().unwrap_or_default();
        if value.is_empty() {
            if required {
                cause(causes, format!("spec.names.{field}"), "Required value");
            }
        } else if matches!(field, "plural" | "singular") && !is_dns_label(value) {
            cause(
                causes,
                format!("spec.names.{field}"),
                format!(
                    "Invalid value: {value:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
                ),
            );
        }
    }
    for (i, short) in strings(&names["shortNames"]).iter().enumerate() {
        if !is_dns_label(short) {
            cause(
                causes,
                format!("spec.names.shortNames[{i}]"),
                format!(
                    "Invalid value: {short:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
                ),
            );
        }
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let single = versions.len() == 1;
    let mut seen = HashSet::new();
    for (i, version) in versions.iter().enumerate() {
        let at = format!("spec.versions[{i}]");
        match version["name"].as_str() {
            Some(v) if is_dns_label(v) => {
                if !seen.insert(v.to_string()) {
                    cause(
                        causes,
                        format!("{at}.name"),
                        format!("Duplicate value: {v:?}"),
                    );
                }
            }
            Some(v) => cause(
                causes,
                format!("{at}.name"),
                format!(
                    "Invalid value: {v:?}: a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
                ),
            ),
            None => cause(causes, format!("{at}.name"), "Required value"),
        }
        let schema_at = if single {
            "spec.validation.openAPIV3Schema".to_string()
        } else {
            format!("{at}.schema.openAPIV3Schema")
        };
        match version["schema"].get("openAPIV3Schema") {
            Some(s) if s.is_object() => validate_schema(s, &schema_at, true, causes),
            _ => cause(
                causes,
                format!("{at}.schema.openAPIV3Schema"),
                "Required value",
            ),
        }
        let columns_at = if single {
            "spec.additionalPrinterColumns".to_string()
        } else {
            format!("{at}.additionalPrinterColumns")
        };
        for (j, column) in version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{columns_at}[{j}]");
            if column["name"].as_str().is_none_or(str::is_empty) {
                cause(causes, format!("{at}.name"), "Required value");
            }
            match column["type"].as_str() {
                Some(t) if COLUMN_TYPES.split(',').any(|c| c == t) => {}
                Some(t) => cause(
                    causes,
                    format!("{at}.type"),
                    format!("Invalid value: {t:?}: must be one of {COLUMN_TYPES}"),
                ),
                None => cause(causes, format!("{at}.type"), "Required value"),
            }
            match column["jsonPath"].as_str() {
                Some(p) if p.starts_with('.') && JsonPath::parse(p).is_ok() => {}
                Some(p) if !p.starts_with('.') => cause(
                    causes,
                    format!("{at}.JSONPath"),
                    format!("Invalid value: {p:?}: must be a simple json path starting with ."),
                ),
                Some(p) => cause(
                    causes,
                    format!("{at}.JSONPath"),
                    format!("Invalid value: {p:?}: must be a simple json path"),
                ),
                None => cause(causes, format!("{at}.JSONPath"), "Required value"),
            }
        }
        if let Some(scale) = version["subresources"]
            .get("scale")
            .filter(|s| s.is_object())
        {
            for field in ["specReplicasPath", "statusReplicasPath"] {
                match scale[field].as_str() {
                    Some(p) if p.starts_with('.') && JsonPath::parse(p).is_ok() => {}
                    Some(p) => cause(
                        causes,
                        format!("{at}.subresources.scale.{field}"),
                        format!(
                            "Invalid value: {p:?}: should be a json path under either .spec or .status"
                        ),
                    ),
                    None => cause(
                        causes,
                        format!("{at}.subresources.scale.{field}"),
                        "Required value",
                    ),
                }
            }
        }
    }
    let storage = versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if storage != 1 {
        cause(
            causes,
            "spec.versions",
            format!(
                "Invalid value: {}: must have exactly one version marked as storage version",
                Value::Array(versions.clone())
            ),
        );
    }
    if !versions.is_empty() && !versions.iter().any(|v| v["served"] == json!(true)) {
        cause(
            causes,
            "spec.versions",
            format!(
                "Invalid value: {}: must have at least one version marked as served",
                Value::Array(versions.clone())
            ),
        );
    }
}

/// The structural-schema rules kube-apiserver enforces that this server relies on: types,
/// compilable patterns, no `uniqueItems`.
fn validate_schema(schema: &Value, at: &str, root: bool, causes: &mut Vec<Cause>) {
    let free = schema["x-kubernetes-int-or-string"] == json!(true)
        || schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
    match schema["type"].as_str() {
        None | Some("") if root => cause(
            causes,
            format!("{at}.type"),
            "Required value: must not be empty at the root",
        ),
        None | Some("") if !free => cause(
            causes,
            format!("{at}.type"),
            "Required value: must not be empty for specified object fields",
        ),
        Some(t) if !t.is_empty() && !SCHEMA_TYPES.contains(&t) => {
            let supported: Vec<String> = SCHEMA_TYPES.iter().map(|t| format!("{t:?}")).collect();
            cause(
                causes,
                format!("{at}.type"),
                format!(
                    "Unsupported value: {t:?}: supported values: {}",
                    supported.join(", ")
                ),
            )
        }
        Some(t) if root && t != "object" => cause(
            causes,
            format!("{at}.type"),
            format!("Invalid value: {t:?}: must be object at the root"),
        ),
        _ => {}
    }
    if let Some(pattern) = schema["pattern"].as_str()
        && let Err(e) = regex::Regex::new(pattern)
    {
        cause(
            causes,
            format!("{at}.pattern"),
            format!(
                "Invalid value: {pattern:?}: must be a valid regular expression, but isn't: {}",
                e.to_string().lines().last().unwrap_or_default().trim()
            ),
        );
    }
    if schema["uniqueItems"] == json!(true) {
        cause(
            causes,
            format!("{at}.uniqueItems"),
            "Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
        );
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (key, sub) in properties {
            validate_schema(sub, &format!("{at}.properties[{key}]"), false, causes);
        }
    }
    if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
        validate_schema(items, &format!("{at}.items"), false, causes);
    }
    if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        validate_schema(
            additional,
            &format!("{at}.additionalProperties"),
            false,
            causes,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Custom resource objects
// ---------------------------------------------------------------------------------------------

/// The paths (`spec.foo`, `spec.items[0].bar`) of fields in `object` that the schema of the
/// custom resource `info` does not declare: what pruning drops, and what `fieldValidation`
/// reports. Empty for built-in resources and for schemas that preserve unknown fields.
pub fn unknown_fields(info: &ResourceInfo, object: &Value) -> Vec<String> {
    let Some(served) = served_version(info) else {
        return Vec::new();
    };
    let Some(schema) = &served.schema else {
        return Vec::new();
    };
    let mut copy = object.clone();
    schema::prune(schema, &mut copy)
}

/// The write rules of custom resources and definitions, called by `objects::prepare_create`
/// (`current` is `None`) and `objects::prepare_update` before the generic validation: for a
/// custom resource, the status split on create, pruning, defaulting and schema validation,
/// `metadata.generation`, and the `scale` replicas check; for a definition, its defaults.
pub fn prepare(
    info: &ResourceInfo,
    current: Option<&Value>,
    object: &mut Value,
) -> Result<(), ApiError> {
    if info.group == GROUP && info.plural == "customresourcedefinitions" {
        default_definition(object);
        if current.is_none()
            && let Some(meta) = object["metadata"].as_object_mut()
        {
            meta.remove("finalizers");
        }
        if current.is_none() {
            object["status"] = json!({"storedVersions": [], "conditions": [], "acceptedNames": {"plural": "", "kind": ""}});
        }
        return Ok(());
    }
    let Some(served) = served_version(info) else {
        return Ok(());
    };
    if current.is_none() && served.terminating {
        return Err(ApiError::method_not_allowed(
            "create not allowed while custom resource definition is terminating",
        ));
    }
    let has_status = info.has_subresource("status");
    if current.is_none()
        && has_status
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    schema::normalize_numbers(object);
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut causes = Vec::new();
    if let Some(schema) = &served.schema {
        schema::prune(schema, object);
        schema::apply_defaults(schema, object);
        causes = schema::validate(schema, object);
    }
    // Stored in the storage version: what its schema does not declare is dropped too, as
    // kube-apiserver's storage decoding does.
    if let Some(storage) = storage_schema(&served) {
        schema::prune(&storage, object);
    }
    if let Some(scale) = &served.scale {
        replicas_causes(&scale.spec_replicas, object, &mut causes);
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(info.kind, &name, causes));
    }
    match current {
        None => object["metadata"]["generation"] = json!(1),
        Some(current) => {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            let changed = if has_status {
                object["spec"] != current["spec"]
            } else {
                let strip = |v: &Value| {
                    let mut v = v.clone();
                    if let Some(m) = v.as_object_mut() {
                        m.remove("metadata");
                    }
                    v
                };
                strip(object) != strip(current)
            };
            object["metadata"]["generation"] =
                json!(if changed { generation + 1 } else { generation });
        }
    }
    Ok(())
}

/// A write to a custom resource's `/status` (the object with only `status` taken from the
/// request): pruned, defaulted, and its `status` validated against the schema.
pub fn prepare_status(info: &ResourceInfo, object: &mut Value) -> Result<(), ApiError> {
    let Some(served) = served_version(info) else {
        return Ok(());
    };
    let Some(schema) = &served.schema else {
        return Ok(());
    };
    schema::normalize_numbers(object);
    schema::prune(schema, object);
    schema::apply_defaults(schema, object);
    let mut causes = match (schema["properties"].get("status"), object.get("status")) {
        (Some(status_schema), Some(status)) => {
            schema::validate_subtree(status_schema, status, "status")
        }
        _ => Vec::new(),
    };
    if let Some(scale) = &served.scale {
        replicas_causes(&scale.status_replicas, object, &mut causes);
    }
    if causes.is_empty() {
        Ok(())
    } else {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        Err(ApiError::invalid(info.kind, name, causes))
    }
}

/// The checks of a `scale` replicas path kube-apiserver makes on every write: a
/// non-negative integer when present.
fn replicas_causes(path_text: &str, object: &Value, causes: &mut Vec<Cause>) {
    let Some(replicas) = JsonPath::parse(path_text)
        .ok()
        .and_then(|path| path.first(object).cloned())
    else {
        return;
    };
    match replicas.as_i64() {
        Some(n) if n < 0 => cause(
            causes,
            path_text,
            format!("Invalid value: {n}: should be a non-negative integer"),
        ),
        Some(_) => {}
        None => cause(
            causes,
            path_text,
            format!(
                "Invalid value: 0: {path_text} accessor error: {} is of the type {}, expected int64",
                replicas
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| replicas.to_string()),
                go_type(&replicas)
            ),
        ),
    }
}

fn go_type(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Bool(_) => "bool",
        Value::Number(_) => "float64",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
        Value::Null => "nil",
    }
}

/// The schema of the storage version of `served`'s definition, when `served` is not it.
fn storage_schema(served: &Served) -> Option<Value> {
    if served.storage {
        return None;
    }
    registry()
        .get(&served.definition)?
        .iter()
        .find(|s| s.storage)
        .and_then(|s| s.schema.clone())
}

/// Whether [`present`] changes objects of `info` (a custom resource's served version), so
/// that they cannot be answered exactly as stored.
pub fn presents(info: &ResourceInfo) -> bool {
    served_version(info).is_some()
}

/// A stored custom resource as the version `info` serves it: its `apiVersion`, and the
/// schema's pruning and defaults (kube-apiserver prunes and defaults on read too).
/// Built-ins are left alone.
pub fn present(info: &ResourceInfo, object: &mut Value) {
    let Some(served) = served_version(info) else {
        return;
    };
    object["apiVersion"] = json!(info.api_version());
    if let Some(schema) = &served.schema {
        schema::prune(schema, object);
        schema::apply_defaults(schema, object);
    }
}

/// The Table for `objects` of `info`: the version's printer columns for a custom resource,
/// [`resources::table_with`] for anything else.
pub fn table_with(
    info: &ResourceInfo,
    objects: &[Value],
    list_rv: &str,
    now: OffsetDateTime,
    options: TableOptions,
) -> Value {
    match served_version(info) {
        Some(served) => printer::table(&served.columns, objects, list_rv, now, options),
        None => resources::table_with(info.kind, objects, list_rv, now, options),
    }
}

/// The component schema of a custom resource's kind in the OpenAPI documents: the version's
/// schema with `apiVersion`, `kind` and `metadata` declared and the group-version-kind
/// extension, as kube-apiserver publishes it (`kubectl explain` reads it).
pub fn openapi_schema(info: &ResourceInfo) -> Option<Value> {
    let served = served_version(info)?;
    let mut schema = served
        .schema
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    if !schema["properties"].is_object() {
        schema["properties"] = json!({});
    }
    schema["properties"]["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
    schema["properties"]["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
    schema["properties"]["metadata"] = json!({"type": "object", "description": "Standard object's metadata.", "x-kubernetes-preserve-unknown-fields": true});
    schema["x-kubernetes-group-version-kind"] =
        json!([{"group": info.group, "version": info.version, "kind": info.kind}]);
    Some(schema)
}

/// The OpenAPI definition name of a custom resource's kind: the group reversed, as
/// kube-apiserver names them (`com.example.v1.Widget`).
pub fn definition_name(info: &ResourceInfo) -> String {
    let reversed: Vec<&str> = info.group.split('.').rev().collect();
    format!("{}.{}.{}", reversed.join("."), info.version, info.kind)
}

// ---------------------------------------------------------------------------------------------
// The scale subresource
// ---------------------------------------------------------------------------------------------

/// The `scale` subresource of a custom resource: the shared one (`apiserver::scale`) at the
/// paths its definition declares, so a scale write goes through the same update path (schema
/// checks, managedFields, `dryRun`) as any other write.
pub async fn serve_scale(
    api: &std::sync::Arc<super::verbs::Api>,
    method: axum::http::Method,
    request: &super::request::ResourceRequest,
    headers: &axum::http::HeaderMap,
    body: &bytes::Bytes,
    manager: &str,
) -> Result<axum::response::Response, ApiError> {
    let info = request.info;
    let served =
        served_version(info).ok_or_else(|| ApiError::not_found(info.group, info.plural, ""))?;
    let declared = served
        .scale
        .as_ref()
        .ok_or_else(|| ApiError::not_found(info.group, info.plural, ""))?;
    let paths = super::scale::ScalePaths::from_json_paths(
        &declared.spec_replicas,
        &declared.status_replicas,
        declared.label_selector.as_deref(),
    );
    super::scale::serve_with(api, &paths, method, request, headers, body, manager).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widget_definition(name: &str, plural: &str, kind: &str, shorts: &[&str]) -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"group": name.split_once('.').map(|(_, g)| g).unwrap_or_default(),
                "scope": "Namespaced",
                "names": {"plural": plural, "kind": kind, "shortNames": shorts},
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                    {"name": "v1", "served": true, "storage": true,
                     "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}},
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {"replicas": {"type": "integer"}}}}}}},
                    {"name": "v2alpha1", "served": false, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                ]},
        })
    }

    #[test]
    fn version_priority_follows_kube() {
        let mut versions = vec!["v1alpha1", "foo", "v2", "v1beta2", "v1", "v1beta1", "v10"];
        versions.sort_by_key(|v| version_priority(v));
        assert_eq!(
            versions,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }

    #[test]
    fn established_definitions_are_looked_up_and_conflicts_are_not() {
        let mut definition = widget_definition(
            "sprockets.unit.example.com",
            "sprockets",
            "Sprocket",
            &["spr"],
        );
        default_definition(&mut definition);
        let status = establish(&definition, OffsetDateTime::now_utc());
        assert_eq!(status["conditions"][0]["type"], "NamesAccepted");
        assert_eq!(status["conditions"][1]["type"], "Established");
        assert_eq!(status["conditions"][1]["status"], "True");
        assert_eq!(status["storedVersions"], json!(["v1"]));
        let v1 = resources::lookup("unit.example.com", "v1", "sprockets").expect("served");
        assert_eq!(v1.kind, "Sprocket");
        assert!(v1.has_subresource("scale") && v1.has_subresource("status"));
        assert!(resources::lookup("unit.example.com", "v1beta1", "sprockets").is_some());
        assert!(resources::lookup("unit.example.com", "v2alpha1", "sprockets").is_none());
        assert_eq!(
            resources::lookup_kind("unit.example.com", "v1", "Sprocket").map(|i| i.plural),
            Some("sprockets")
        );
        assert!(is_custom(v1));
        assert!(!is_custom(objects::namespace_info()));
        // Re-establishing interns nothing new: the same &'static info comes back.
        establish(&definition, OffsetDateTime::now_utc());
        let again = resources::lookup("unit.example.com", "v1", "sprockets").expect("served");
        assert!(std::ptr::eq(v1, again));

        let mut rival = widget_definition("cogs.unit.example.com", "cogs", "Sprocket", &["spr"]);
        default_definition(&mut rival);
        let status = establish(&rival, OffsetDateTime::now_utc());
        assert_eq!(status["conditions"][0]["status"], "False");
        assert_eq!(status["conditions"][0]["reason"], "ListKindConflict");
        assert_eq!(
            status["conditions"][0]["message"],
            "\"SprocketList\" is already in use"
        );
        assert_eq!(status["conditions"][1]["status"], "False");
        assert_eq!(status["acceptedNames"]["plural"], "cogs");
        assert!(status["acceptedNames"].get("shortNames").is_none());
        assert!(resources::lookup("unit.example.com", "v1", "cogs").is_none());
        registry_mut().remove("sprockets.unit.example.com");
        assert!(resources::lookup("unit.example.com", "v1", "sprockets").is_none());
    }

    #[test]
    fn definitions_are_validated_like_kube_apiserver() {
        let messages = |definition: Value| {
            let mut causes = Vec::new();
            validate_definition(&definition, &mut causes);
            causes
                .into_iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect::<Vec<_>>()
        };
        let mut wrong_name = widget_definition("foo.example.com", "bars", "Bar", &[]);
        default_definition(&mut wrong_name);
        assert_eq!(
            messages(wrong_name),
            [
                r#"metadata.name: Invalid value: "foo.example.com": must be spec.names.plural+"."+spec.group"#
            ]
        );
        let got = messages(
            json!({"metadata": {"name": "bars.example"}, "spec": {"group": "example",
            "scope": "Bogus", "names": {"plural": "bars"},
            "versions": [{"name": "v1", "served": true, "storage": false}]}}),
        );
        for want in [
            r#"spec.group: Invalid value: "example": should be a domain with at least one dot"#,
            r#"spec.scope: Unsupported value: "Bogus": supported values: "Cluster", "Namespaced""#,
            "spec.versions[0].schema.openAPIV3Schema: Required value",
            "spec.names.kind: Required value",
        ] {
            assert!(got.iter().any(|g| g == want), "{want} in {got:#?}");
        }
        assert!(
            got.iter()
                .any(|g| g.ends_with("must have exactly one version marked as storage version"))
        );
        let got = messages(
            json!({"metadata": {"name": "quxs.example.com"}, "spec": {"group": "example.com",
            "scope": "Namespaced", "names": {"plural": "quxs", "singular": "qux", "kind": "Qux", "listKind": "QuxList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "additionalPrinterColumns": [{"name": "X", "type": "string", "jsonPath": "spec.x"},
                                             {"name": "Y", "type": "foo", "jsonPath": ".spec.y"}],
                "schema": {"openAPIV3Schema": {"properties": {"spec": {"properties": {
                    "a": {"type": "strin"}, "b": {"type": "string", "pattern": "(("},
                    "c": {"type": "array", "uniqueItems": true, "items": {"type": "string"}}}}}}}}]}}),
        );
        let want = [
            "spec.validation.openAPIV3Schema.type: Required value: must not be empty at the root",
            "spec.validation.openAPIV3Schema.properties[spec].type: Required value: must not be empty for specified object fields",
            r#"spec.validation.openAPIV3Schema.properties[spec].properties[a].type: Unsupported value: "strin": supported values: "array", "boolean", "integer", "number", "object", "string""#,
            "spec.validation.openAPIV3Schema.properties[spec].properties[c].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            r#"spec.additionalPrinterColumns[0].JSONPath: Invalid value: "spec.x": must be a simple json path starting with ."#,
            r#"spec.additionalPrinterColumns[1].type: Invalid value: "foo": must be one of boolean,date,integer,number,string"#,
        ];
        for w in want {
            assert!(got.iter().any(|g| g == w), "{w} in {got:#?}");
        }
        assert!(got.iter().any(|g| g.starts_with(
            r#"spec.validation.openAPIV3Schema.properties[spec].properties[b].pattern: Invalid value: "((": must be a valid regular expression"#
        )));
    }

    #[test]
    fn unknown_fields_are_what_the_schema_prunes() {
        let mut definition = widget_definition("knobs.unit2.example.com", "knobs", "Knob", &[]);
        default_definition(&mut definition);
        establish(&definition, OffsetDateTime::now_utc());
        let info = resources::lookup("unit2.example.com", "v1", "knobs").expect("served");
        let object = json!({"apiVersion": "unit2.example.com/v1", "kind": "Knob",
            "metadata": {"name": "k"}, "spec": {"replicas": 1, "turns": 3}, "extra": true});
        let mut unknown = unknown_fields(info, &object);
        unknown.sort();
        assert_eq!(unknown, ["extra", "spec.turns"]);
        // The v1beta1 schema declares nothing under the root: everything but the
        // always-kept fields is unknown there.
        let beta = resources::lookup("unit2.example.com", "v1beta1", "knobs").expect("served");
        assert_eq!(
            unknown_fields(beta, &json!({"metadata": {}, "spec": {}})),
            ["spec"]
        );
        assert!(unknown_fields(objects::namespace_info(), &object).is_empty());
        let mut written = object.clone();
        let e = prepare(
            info,
            None,
            &mut json!({"metadata": {"name": "k"}, "spec": {"replicas": -2}}),
        )
        .expect_err("negative replicas");
        assert_eq!(
            e.causes()[0].message,
            "Invalid value: -2: should be a non-negative integer"
        );
        prepare(info, None, &mut written).expect("valid");
        assert!(written.get("extra").is_none() && written["spec"].get("turns").is_none());
        assert_eq!(written["metadata"]["generation"], 1);
        registry_mut().remove("knobs.unit2.example.com");
    }
}
