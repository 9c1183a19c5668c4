//! Server-side apply: managedFields, field managers, conflicts and force (`application/apply-patch+yaml`).
//!
//! What kube-apiserver does with structured-merge-diff, over JSON values:
//! - Every write records who owns which fields in `metadata.managedFields`: one entry per
//!   manager, operation (`Apply` or `Update`) and subresource, its fields in the `FieldsV1`
//!   encoding (`f:<field>`, `k:<key of a list element>`, `v:<value of a set element>`, `.` for
//!   "this node itself"). An `Update` (create, update, patch) takes the fields it changed from
//!   every other manager ([`track_update`]); a request that sets `managedFields` itself is
//!   honoured as the starting point.
//! - An apply ([`apply`]) merges the applied configuration into the live object, owns exactly
//!   the fields of the configuration, removes the fields it applied last time and no longer
//!   applies (unless another manager owns them), and refuses to change a field another manager
//!   owns (409 with one cause per field) unless forced, which moves ownership to it.
//! - Lists merge by their list type ([`ListType`]): associative lists by their keys (the
//!   strategic-merge table of `patch.rs`, with apply's own keys where they differ: container
//!   ports by `containerPort` and `protocol`), sets of primitives, and atomic lists (every
//!   other list, and every list of a custom resource, whose CRD schema is not read yet). Maps
//!   merge key by key unless atomic (label selectors, `nodeSelector`).

use std::collections::{BTreeMap, HashMap};

use axum::http::{HeaderMap, header};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::objects::timestamp;
use super::patch::{self, ListMerge};
use super::resources::ResourceInfo;
use super::status::{ApiError, Cause};

/// The annotation client-side `kubectl apply` keeps its last configuration in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// The manager kube-apiserver records for what an object held before its first apply.
const BEFORE_FIRST_APPLY: &str = "before-first-apply";
/// kube-apiserver's limit on a field manager's length.
const MAX_MANAGER_LENGTH: usize = 128;

// ---------------------------------------------------------------------------------------------
// Field sets and their FieldsV1 encoding.
// ---------------------------------------------------------------------------------------------

/// A set of field paths, as a tree: each node is one path element in its `FieldsV1` spelling
/// (`f:name`, `k:{"name":"c"}`, `v:"x"`), `member` when the path ending there is in the set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    /// Decodes a `fieldsV1` object; `None` when it is not one.
    pub fn from_fields_v1(value: &Value) -> Option<FieldSet> {
        let Value::Object(map) = value else {
            return None;
        };
        let mut set = FieldSet::default();
        for (element, child) in map {
            if element == "." {
                set.member = true;
                continue;
            }
            let mut child = FieldSet::from_fields_v1(child)?;
            if child.children.is_empty() {
                child.member = true;
            }
            set.children.insert(element.clone(), child);
        }
        Some(set)
    }

    /// The `fieldsV1` encoding: `{}` for a leaf, `".": {}` for a member with children.
    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (element, child) in &self.children {
            map.insert(element.clone(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    /// Whether no path is in the set.
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    fn child(&mut self, element: &str) -> &mut FieldSet {
        self.children.entry(element.to_string()).or_default()
    }

    /// Adds the path `elements`.
    fn insert(&mut self, elements: &[String]) {
        match elements.split_first() {
            None => self.member = true,
            Some((first, rest)) => self.child(first).insert(rest),
        }
    }

    fn union(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (element, child) in &other.children {
            self.child(element).union(child);
        }
    }

    /// The paths of `self` that are not in `other`.
    fn minus(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && !other.member,
            children: BTreeMap::new(),
        };
        for (element, child) in &self.children {
            let rest = match other.children.get(element) {
                Some(o) => child.minus(o),
                None => child.clone(),
            };
            if !rest.is_empty() {
                out.children.insert(element.clone(), rest);
            }
        }
        out
    }

    /// The paths in both.
    fn intersect(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && other.member,
            children: BTreeMap::new(),
        };
        for (element, child) in &self.children {
            if let Some(o) = other.children.get(element) {
                let both = child.intersect(o);
                if !both.is_empty() {
                    out.children.insert(element.clone(), both);
                }
            }
        }
        out
    }

    fn at(&self, elements: &[String]) -> Option<&FieldSet> {
        match elements.split_first() {
            None => Some(self),
            Some((first, rest)) => self.children.get(first)?.at(rest),
        }
    }

    /// Every path in the set, parents before children, in encoding order.
    fn paths(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (element, child) in &self.children {
            prefix.push(element.clone());
            child.collect(prefix, out);
            prefix.pop();
        }
    }

    fn remove_child(&mut self, element: &str) {
        self.children.remove(element);
    }
}

/// A path as kube-apiserver prints it in conflicts: `.spec.replicas`,
/// `.spec.containers[name="c"].image`, `.metadata.finalizers[="x"]`.
pub fn display_path(elements: &[String]) -> String {
    let mut out = String::new();
    for element in elements {
        if let Some(name) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = element.strip_prefix("k:") {
            let fields: Vec<String> = match serde_json::from_str::<Map<String, Value>>(key) {
                Ok(map) => map.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                Err(_) => vec![key.to_string()],
            };
            out.push_str(&format!("[{}]", fields.join(",")));
        } else if let Some(value) = element.strip_prefix("v:") {
            out.push_str(&format!("[={value}]"));
        } else if let Some(index) = element.strip_prefix("i:") {
            out.push_str(&format!("[{index}]"));
        } else {
            out.push_str(element);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// What apply knows of a kind's shape.
// ---------------------------------------------------------------------------------------------

/// How a list merges under apply (`x-kubernetes-list-type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    /// Replaced whole and owned as one field.
    Atomic,
    /// Primitives merged as a set; each value owned on its own.
    Set,
    /// Objects merged by these key fields; each element owned on its own.
    Map(Vec<&'static str>),
}

/// The kinds whose pods come from a template, and where the template is.
fn template_prefix(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Deployment"
        | "ReplicaSet"
        | "DaemonSet"
        | "StatefulSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        "PodTemplate" => Some(&["template"]),
        _ => None,
    }
}

/// The path inside a pod that `names` is at: the path itself for a Pod, the part after the
/// template for a workload.
fn pod_path<'n>(kind: &str, names: &'n [&'n str]) -> Option<&'n [&'n str]> {
    if kind == "Pod" {
        return Some(names);
    }
    names.strip_prefix(template_prefix(kind)?)
}

/// The list type of the list at `names` (field names from the root) in an object of `kind`.
pub fn list_type(kind: &str, names: &[&str]) -> ListType {
    let Some((last, parents)) = names.split_last() else {
        return ListType::Atomic;
    };
    if *last == "ports"
        && matches!(
            parents.last(),
            Some(&("containers" | "initContainers" | "ephemeralContainers"))
        )
    {
        return ListType::Map(vec!["containerPort", "protocol"]);
    }
    if kind == "Service" && names == ["spec", "ports"] {
        return ListType::Map(vec!["port", "protocol"]);
    }
    if *last == "hostIPs" {
        return ListType::Atomic;
    }
    let merge = patch::list_merge(kind, names)
        .or_else(|| pod_path(kind, names).and_then(|rest| patch::list_merge("Pod", rest)))
        .or_else(|| {
            (names.first() == Some(&"metadata"))
                .then(|| patch::list_merge("ConfigMap", names))
                .flatten()
        });
    match merge {
        Some(ListMerge::ByKey(key)) => ListType::Map(vec![key]),
        Some(ListMerge::Set) => ListType::Set,
        Some(ListMerge::Replace) => ListType::Atomic,
        None if names == ["status", "conditions"]
            && matches!(
                kind,
                "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet"
            ) =>
        {
            ListType::Map(vec!["type"])
        }
        None => ListType::Atomic,
    }
}

/// Whether the map at `names` is owned as one field (`x-kubernetes-map-type: atomic`).
fn atomic_map(kind: &str, names: &[&str]) -> bool {
    if names == ["spec", "selector"]
        && matches!(
            kind,
            "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" | "Service"
        )
    {
        return true;
    }
    pod_path(kind, names) == Some(&["spec", "nodeSelector"])
}

/// Whether the field at `names` exists (empty) in a freshly decoded object of `kind`, as a
/// non-pointer struct or a list without `omitempty` does in kube-apiserver: adding content to
/// it does not make the field itself a member of an `Update`'s fields (no `.` entry).
fn present_when_empty(kind: &str, names: &[&str]) -> bool {
    if matches!(names, ["metadata"] | ["spec"] | ["status"]) {
        return true;
    }
    if let Some(prefix) = template_prefix(kind)
        && !names.is_empty()
        && prefix.starts_with(names)
    {
        return true;
    }
    if let Some(rest) = pod_path(kind, names)
        && matches!(
            rest,
            ["metadata"] | ["spec"] | ["spec", "containers"] | ["status"]
        )
    {
        return true;
    }
    matches!(
        (kind, names),
        ("Deployment", ["spec", "strategy"])
            | ("DaemonSet" | "StatefulSet", ["spec", "updateStrategy"])
    )
}

/// The value a key field has when an element leaves it out.
fn key_default(field: &str) -> Option<Value> {
    (field == "protocol").then(|| json!("TCP"))
}

/// The key of a list element: its key fields (defaulted where the schema defaults them), or
/// `None` when one is missing.
fn element_key(element: &Value, keys: &[&'static str]) -> Option<Map<String, Value>> {
    let object = element.as_object()?;
    let mut key = Map::new();
    for field in keys {
        let value = match object.get(*field) {
            Some(v) if !v.is_null() => v.clone(),
            _ => key_default(field)?,
        };
        key.insert((*field).to_string(), value);
    }
    Some(key)
}

fn key_element(key: &Map<String, Value>) -> String {
    format!("k:{}", Value::Object(key.clone()))
}

fn value_element(value: &Value) -> String {
    format!("v:{value}")
}

/// The keys of every element, or `None` when one has no key or two share one (such a list is
/// then treated as atomic).
fn keys_of(list: &[Value], keys: &[&'static str]) -> Option<Vec<String>> {
    let mut out = Vec::with_capacity(list.len());
    for element in list {
        let key = key_element(&element_key(element, keys)?);
        if out.contains(&key) {
            return None;
        }
        out.push(key);
    }
    Some(out)
}

/// Walks values of one kind with the field names of the current path, so each step can ask
/// the kind's shape.
struct Shape<'k> {
    kind: &'k str,
    names: Vec<String>,
}

impl<'k> Shape<'k> {
    fn new(kind: &'k str) -> Self {
        Shape {
            kind,
            names: Vec::new(),
        }
    }

    fn names(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    fn list_type(&self) -> ListType {
        list_type(self.kind, &self.names())
    }

    fn atomic_map(&self) -> bool {
        atomic_map(self.kind, &self.names())
    }

    fn present_when_empty(&self) -> bool {
        present_when_empty(self.kind, &self.names())
    }

    /// Refuses what apply cannot merge: elements of associative lists without their keys, or
    /// with the same key twice (kube-apiserver's messages).
    fn check_keys(&mut self, value: &Value) -> Result<(), String> {
        match value {
            Value::Object(map) if !self.atomic_map() => {
                for (name, child) in map {
                    self.names.push(name.clone());
                    let result = self.check_keys(child);
                    self.names.pop();
                    result?;
                }
                Ok(())
            }
            Value::Array(list) => {
                let ListType::Map(keys) = self.list_type() else {
                    return Ok(());
                };
                let path = format!(".{}", self.names.join("."));
                let mut seen = Vec::new();
                for (i, element) in list.iter().enumerate() {
                    let Some(key) = element_key(element, &keys) else {
                        let missing = keys
                            .iter()
                            .find(|k| element.get(**k).is_none_or(Value::is_null))
                            .copied()
                            .unwrap_or_default();
                        return Err(format!(
                            "{path}: element {i}: associative list with keys has an element that omits key field {missing:?} (and doesn't have default value)"
                        ));
                    };
                    let key = key_element(&key);
                    if seen.contains(&key) {
                        return Err(format!(
                            "{path}: duplicate entries for key {}",
                            display_path(&[key])
                        ));
                    }
                    seen.push(key);
                    self.check_keys(element)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The fields of an applied configuration: its leaves, atomic values, empty maps and each
    /// element of an associative list or set (structured-merge-diff's `ToFieldSet`).
    fn applied_fields(&mut self, value: &Value, node: &mut FieldSet) {
        match value {
            Value::Object(map) if !self.atomic_map() && !map.is_empty() => {
                for (name, child) in map {
                    self.names.push(name.clone());
                    self.applied_fields(child, node.child(&format!("f:{name}")));
                    self.names.pop();
                }
            }
            Value::Array(list) => match (self.list_type(), list) {
                (ListType::Set, _) => {
                    for element in list {
                        node.child(&value_element(element)).member = true;
                    }
                }
                (ListType::Map(keys), _) if keys_of(list, &keys).is_some() => {
                    for element in list {
                        let Some(key) = element_key(element, &keys) else {
                            continue;
                        };
                        let child = node.child(&key_element(&key));
                        child.member = true;
                        self.applied_fields(element, child);
                    }
                }
                _ => node.member = true,
            },
            _ => node.member = true,
        }
    }

    /// Every path of `value` (at `at`) into `set`, the node itself included: what an `Update`
    /// adds or removes with a whole value.
    fn whole(&mut self, value: &Value, at: &mut Vec<String>, set: &mut FieldSet) {
        set.insert(at);
        match value {
            Value::Object(map) if !self.atomic_map() => {
                for (name, child) in map {
                    self.names.push(name.clone());
                    at.push(format!("f:{name}"));
                    self.whole(child, at, set);
                    at.pop();
                    self.names.pop();
                }
            }
            Value::Array(list) => match self.list_type() {
                ListType::Set => {
                    for element in list {
                        at.push(value_element(element));
                        set.insert(at);
                        at.pop();
                    }
                }
                ListType::Map(keys) if keys_of(list, &keys).is_some() => {
                    for element in list {
                        let Some(key) = element_key(element, &keys) else {
                            continue;
                        };
                        at.push(key_element(&key));
                        self.whole(element, at, set);
                        at.pop();
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// What changed from `old` to `new` (structured-merge-diff's `Compare`).
    fn compare(&mut self, old: &Value, new: &Value, at: &mut Vec<String>, out: &mut Changes) {
        if old == new {
            return;
        }
        match (old, new) {
            (Value::Object(o), Value::Object(n)) if !self.atomic_map() => {
                for (name, nv) in n {
                    self.names.push(name.clone());
                    at.push(format!("f:{name}"));
                    match o.get(name) {
                        Some(ov) => self.compare(ov, nv, at, out),
                        None if self.present_when_empty() => {
                            let empty = match nv {
                                Value::Object(_) => json!({}),
                                Value::Array(_) => json!([]),
                                _ => Value::Null,
                            };
                            self.compare(&empty, nv, at, out);
                        }
                        None => self.whole(nv, at, &mut out.added),
                    }
                    at.pop();
                    self.names.pop();
                }
                for (name, ov) in o {
                    if !n.contains_key(name) {
                        self.names.push(name.clone());
                        at.push(format!("f:{name}"));
                        self.whole(ov, at, &mut out.removed);
                        at.pop();
                        self.names.pop();
                    }
                }
            }
            (Value::Array(o), Value::Array(n)) => match self.list_type() {
                ListType::Set => {
                    for v in n.iter().filter(|v| !o.contains(v)) {
                        at.push(value_element(v));
                        out.added.insert(at);
                        at.pop();
                    }
                    for v in o.iter().filter(|v| !n.contains(v)) {
                        at.push(value_element(v));
                        out.removed.insert(at);
                        at.pop();
                    }
                }
                ListType::Map(keys) => match (keys_of(o, &keys), keys_of(n, &keys)) {
                    (Some(old_keys), Some(new_keys)) => {
                        for (key, element) in new_keys.iter().zip(n) {
                            at.push(key.clone());
                            match old_keys.iter().position(|k| k == key) {
                                Some(i) => self.compare(&o[i], element, at, out),
                                None => self.whole(element, at, &mut out.added),
                            }
                            at.pop();
                        }
                        for (key, element) in old_keys.iter().zip(o) {
                            if !new_keys.contains(key) {
                                at.push(key.clone());
                                self.whole(element, at, &mut out.removed);
                                at.pop();
                            }
                        }
                    }
                    _ => out.modified.insert(at),
                },
                ListType::Atomic => out.modified.insert(at),
            },
            _ => out.modified.insert(at),
        }
    }

    /// `config` merged into `live`: the configuration's values win, maps and associative lists
    /// merge element by element, sets take the union, anything atomic is replaced.
    fn merge(&mut self, live: &Value, config: &Value) -> Value {
        match (live, config) {
            (Value::Object(l), Value::Object(c)) if !self.atomic_map() => {
                let mut out = l.clone();
                for (name, cv) in c {
                    if cv.is_null() {
                        out.remove(name);
                        continue;
                    }
                    self.names.push(name.clone());
                    let merged = match l.get(name) {
                        Some(lv) => self.merge(lv, cv),
                        None => cv.clone(),
                    };
                    self.names.pop();
                    out.insert(name.clone(), merged);
                }
                Value::Object(out)
            }
            (Value::Array(l), Value::Array(c)) => match self.list_type() {
                ListType::Set => {
                    let ids = |list: &[Value]| list.iter().map(value_element).collect::<Vec<_>>();
                    Value::Array(self.merge_elements(l, &ids(l), c, &ids(c)))
                }
                ListType::Map(keys) => match (keys_of(l, &keys), keys_of(c, &keys)) {
                    (Some(live_keys), Some(config_keys)) => {
                        Value::Array(self.merge_elements(l, &live_keys, c, &config_keys))
                    }
                    _ => config.clone(),
                },
                ListType::Atomic => config.clone(),
            },
            _ => config.clone(),
        }
    }

    /// The elements of a keyed list or set (`live` and `config`, each element identified by
    /// the matching entry of `live_ids`/`config_ids`) merged in structured-merge-diff's order:
    /// the elements the configuration names come in its order, each live element it does not
    /// name stays just before the named element that followed it.
    fn merge_elements(
        &mut self,
        live: &[Value],
        live_ids: &[String],
        config: &[Value],
        config_ids: &[String],
    ) -> Vec<Value> {
        let shared: Vec<&String> = config_ids.iter().filter(|k| live_ids.contains(k)).collect();
        let mut next_shared = 0;
        let mut merged: Vec<&String> = Vec::new();
        let mut out = Vec::with_capacity(live.len() + config.len());
        let (mut li, mut ci) = (0, 0);
        while li < live.len() || ci < config.len() {
            if li < live.len() && ci < config.len() {
                if live_ids[li] == config_ids[ci] {
                    out.push(self.merge(&live[li], &config[ci]));
                    merged.push(&config_ids[ci]);
                    if shared.get(next_shared) == Some(&&config_ids[ci]) {
                        next_shared += 1;
                    }
                    li += 1;
                    ci += 1;
                    continue;
                }
                if config_ids.contains(&live_ids[li])
                    && shared
                        .get(next_shared)
                        .is_some_and(|next| **next != live_ids[li])
                {
                    // Named by the configuration, but not the element due here.
                    li += 1;
                    continue;
                }
            }
            if li < live.len() {
                if !config_ids.contains(&live_ids[li]) {
                    out.push(live[li].clone());
                    li += 1;
                    continue;
                }
                if merged.contains(&&live_ids[li]) {
                    li += 1;
                    continue;
                }
            }
            if ci < config.len() {
                let id = &config_ids[ci];
                merged.push(id);
                out.push(match live_ids.iter().position(|k| k == id) {
                    Some(i) => self.merge(&live[i], &config[ci]),
                    None => config[ci].clone(),
                });
                if shared.get(next_shared) == Some(&id) {
                    next_shared += 1;
                }
                ci += 1;
            }
        }
        out
    }
}

/// The result of comparing two versions of an object.
#[derive(Debug, Default)]
struct Changes {
    added: FieldSet,
    modified: FieldSet,
    removed: FieldSet,
}

impl Changes {
    fn changed(&self) -> FieldSet {
        let mut set = self.added.clone();
        set.union(&self.modified);
        set
    }
}

/// Removes the value at `elements` from `value`, and any object or list that removal leaves
/// empty on the way (as kube-apiserver's typed objects drop empty `omitempty` fields).
fn remove_path(value: &mut Value, elements: &[String]) {
    let Some((first, rest)) = elements.split_first() else {
        return;
    };
    let emptied = |v: &Value| match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if let Some(name) = first.strip_prefix("f:") {
        let Some(map) = value.as_object_mut() else {
            return;
        };
        if rest.is_empty() {
            map.remove(name);
        } else if let Some(child) = map.get_mut(name) {
            remove_path(child, rest);
            if emptied(child) {
                map.remove(name);
            }
        }
    } else if let Some(key) = first.strip_prefix("k:") {
        let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
            return;
        };
        let Some(list) = value.as_array_mut() else {
            return;
        };
        let fields: Vec<&str> = key.keys().map(String::as_str).collect();
        let Some(i) = list.iter().position(|element| {
            fields.iter().all(|f| {
                let have = element
                    .get(*f)
                    .filter(|v| !v.is_null())
                    .cloned()
                    .or_else(|| key_default(f));
                have.as_ref() == key.get(*f)
            })
        }) else {
            return;
        };
        if rest.is_empty() {
            list.remove(i);
        } else {
            remove_path(&mut list[i], rest);
        }
    } else if let Some(text) = first.strip_prefix("v:")
        && let (Ok(v), Some(list)) = (serde_json::from_str::<Value>(text), value.as_array_mut())
    {
        list.retain(|element| *element != v);
    }
}

// ---------------------------------------------------------------------------------------------
// managedFields entries.
// ---------------------------------------------------------------------------------------------

/// `Apply` or `Update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    manager: String,
    operation: Operation,
    api_version: String,
    time: Option<String>,
    subresource: String,
    fields: FieldSet,
}

impl Entry {
    fn is(&self, manager: &str, operation: Operation, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }

    /// How kube-apiserver names the manager in a conflict.
    fn describe(&self) -> String {
        let mut out = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            out.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == Operation::Update {
            out.push_str(&format!(" using {}", self.api_version));
        }
        out
    }

    fn encode(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation.as_str(),
            "apiVersion": self.api_version,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_fields_v1(),
        });
        if let Some(time) = &self.time {
            entry["time"] = json!(time);
        }
        if !self.subresource.is_empty() {
            entry["subresource"] = json!(self.subresource);
        }
        entry
    }
}

/// The entries of `object`'s `metadata.managedFields`; entries that do not decode are dropped.
fn decode(object: &Value) -> Vec<Entry> {
    let Some(list) = object["metadata"]["managedFields"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|entry| {
            let operation = match entry["operation"].as_str()? {
                "Apply" => Operation::Apply,
                "Update" => Operation::Update,
                _ => return None,
            };
            Some(Entry {
                manager: entry["manager"].as_str().unwrap_or_default().to_string(),
                operation,
                api_version: entry["apiVersion"].as_str().unwrap_or_default().to_string(),
                time: entry["time"].as_str().map(String::from),
                subresource: entry["subresource"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                fields: FieldSet::from_fields_v1(&entry["fieldsV1"]).unwrap_or_default(),
            })
        })
        .collect()
}

/// Writes `entries` (without empty ones) into `object`, in kube-apiserver's order: `Apply`
/// before `Update`, then by time, manager and subresource.
fn encode_into(object: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.fields.is_empty());
    entries.sort_by(|a, b| {
        (a.operation, &a.time, &a.manager, &a.subresource).cmp(&(
            b.operation,
            &b.time,
            &b.manager,
            &b.subresource,
        ))
    });
    let Some(meta) = object["metadata"].as_object_mut() else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert(
            "managedFields".into(),
            Value::Array(entries.iter().map(Entry::encode).collect()),
        );
    }
}

/// Puts `managed_fields` (an encoded list, or null for none) back into `object` after steps
/// that do not keep them.
pub fn set_managed_fields(object: &mut Value, managed_fields: Value) {
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if managed_fields.is_null() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), managed_fields);
    }
}

/// `object` without `metadata.managedFields`.
fn without_managed_fields(object: &Value) -> Value {
    let mut out = object.clone();
    if let Some(meta) = out["metadata"].as_object_mut() {
        meta.remove("managedFields");
    }
    out
}

/// Takes out of `set` what no manager owns: the type and identity fields the server sets, and
/// the part the request's endpoint does not write (status on the main resource of a kind with
/// a status subresource, everything but status on `/status`).
fn strip(info: &ResourceInfo, subresource: &str, set: &mut FieldSet) {
    set.member = false;
    set.remove_child("f:apiVersion");
    set.remove_child("f:kind");
    if let Some(meta) = set.children.get_mut("f:metadata") {
        meta.member = false;
        for field in [
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            meta.remove_child(&format!("f:{field}"));
        }
    }
    if subresource == "status" {
        set.children.retain(|element, _| element == "f:status");
    } else if info.subresources.contains(&"status") {
        set.remove_child("f:status");
    }
    set.children.retain(|_, child| !child.is_empty());
}

fn changes(info: &ResourceInfo, subresource: &str, old: &Value, new: &Value) -> Changes {
    let mut out = Changes::default();
    Shape::new(info.kind).compare(old, new, &mut Vec::new(), &mut out);
    strip(info, subresource, &mut out.added);
    strip(info, subresource, &mut out.modified);
    strip(info, subresource, &mut out.removed);
    out
}

// ---------------------------------------------------------------------------------------------
// Requests.
// ---------------------------------------------------------------------------------------------

/// The manager of a write: the `fieldManager` query parameter, or else what kube-apiserver
/// derives from the User-Agent (its part before the first `/`: `kubectl`, `kube-controller-manager`).
pub fn field_manager(query: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return manager.clone();
    }
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let prefix = agent.split('/').next().unwrap_or_default();
    if prefix.is_empty() {
        // What kube-apiserver records for a client without a User-Agent (observed).
        return "unknown".into();
    }
    prefix.chars().take(MAX_MANAGER_LENGTH).collect()
}

fn invalid_patch_options(field: &str, message: &str) -> ApiError {
    invalid_options("PatchOptions", field, message)
}

/// kube-apiserver's 422 for bad request options (`PatchOptions.meta.k8s.io "" is invalid: ...`).
fn invalid_options(options: &str, field: &str, message: &str) -> ApiError {
    let mut e = ApiError::invalid(
        &format!("{options}.meta.k8s.io"),
        "",
        vec![Cause {
            field: field.into(),
            message: message.into(),
        }],
    );
    if let Some(details) = e.details.as_mut() {
        details.name = None;
        details.group = Some("meta.k8s.io".into());
        details.kind = Some(options.into());
    }
    e
}

/// Whether the `fieldManager` of a write may be used: at most 128 bytes, printable characters
/// only (kube-apiserver's 422 naming `options`: `CreateOptions`, `UpdateOptions` or
/// `PatchOptions`).
pub fn check_field_manager(options: &str, query: &HashMap<String, String>) -> Result<(), ApiError> {
    let Some(manager) = query.get("fieldManager") else {
        return Ok(());
    };
    if manager.len() > MAX_MANAGER_LENGTH {
        return Err(invalid_options(
            options,
            "fieldManager",
            &format!("Too long: may not be more than {MAX_MANAGER_LENGTH} bytes"),
        ));
    }
    if let Some((i, c)) = manager
        .char_indices()
        .find(|(_, c)| c.is_control() || (c.is_whitespace() && *c != ' '))
    {
        return Err(invalid_options(
            options,
            "fieldManager",
            &format!(
                "Invalid value: {manager:?}: invalid character U+{:04X} (at position {i})",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// The `force` option of a PATCH: only an apply may have it, and an apply needs a
/// `fieldManager` (kube-apiserver's 422s).
pub fn patch_force(apply: bool, query: &HashMap<String, String>) -> Result<bool, ApiError> {
    let force = match query.get("force").map(String::as_str) {
        None => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0" | "") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "force: invalid boolean value {other:?}"
            )));
        }
    };
    if !apply {
        if force.is_some() {
            return Err(invalid_patch_options(
                "force",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
        return Ok(false);
    }
    if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
        return Err(invalid_patch_options(
            "fieldManager",
            "Required value: is required for apply patch",
        ));
    }
    Ok(force.unwrap_or(false))
}

/// The applied configuration of an apply PATCH: YAML or JSON, one object with `apiVersion`,
/// `kind` and no `managedFields`.
pub fn parse_config(body: &[u8]) -> Result<Value, ApiError> {
    let config: Value = serde_yaml_ng::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    if !config.is_object() {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    }
    for field in ["apiVersion", "kind"] {
        if config[field].as_str().is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(format!(
                "Object '{}' is missing in '{}'",
                if field == "kind" {
                    "Kind"
                } else {
                    "apiVersion"
                },
                config
            )));
        }
    }
    if !config["metadata"]["managedFields"].is_null() {
        return Err(ApiError::bad_request("metadata.managedFields must be nil"));
    }
    Ok(config)
}

/// Records an `Update` by `manager` of `new` (the object about to be stored; `current` is the
/// stored one, `None` on create) in `new`'s `managedFields`. `requested` is the
/// `managedFields` the request itself carried: when it has entries, they are the starting
/// point (a client may rewrite ownership); otherwise the stored object's are. Fields this
/// write changed move to `manager`; a manager left with no field is dropped.
pub fn track_update(
    info: &ResourceInfo,
    subresource: Option<&str>,
    current: Option<&Value>,
    new: &mut Value,
    requested: &Value,
    manager: &str,
    now: OffsetDateTime,
) {
    let subresource = subresource.unwrap_or_default();
    // `[]` or `[{}]` is kube-apiserver's reset: no managedFields at all, this write included.
    if matches!(requested.as_array().map(Vec::as_slice), Some([]))
        || matches!(requested.as_array().map(Vec::as_slice), Some([Value::Object(m)]) if m.is_empty())
    {
        set_managed_fields(new, Value::Null);
        return;
    }
    // Other entries are the client's word (a subresource never sets them); none keeps the
    // stored ones, so a client unaware of them cannot erase them.
    let honoured = requested.is_array() && subresource.is_empty();
    let mut entries = if honoured {
        decode(&json!({"metadata": {"managedFields": requested}}))
    } else {
        current.map(decode).unwrap_or_default()
    };
    let old = current.map_or_else(|| json!({}), without_managed_fields);
    let after = without_managed_fields(new);
    let diff = changes(info, subresource, &old, &after);
    let changed = diff.changed();
    let mut taken = changed.clone();
    taken.union(&diff.removed);
    for entry in entries.iter_mut() {
        if !entry.is(manager, Operation::Update, subresource) {
            entry.fields = entry.fields.minus(&taken);
        }
    }
    if !changed.is_empty() {
        let time = Some(timestamp(now));
        match entries
            .iter_mut()
            .find(|e| e.is(manager, Operation::Update, subresource))
        {
            Some(entry) => {
                entry.fields = entry.fields.minus(&diff.removed);
                entry.fields.union(&changed);
                entry.time = time;
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: Operation::Update,
                api_version: info.api_version(),
                time,
                subresource: subresource.to_string(),
                fields: changed,
            }),
        }
    } else if let Some(entry) = entries
        .iter_mut()
        .find(|e| e.is(manager, Operation::Update, subresource))
    {
        entry.fields = entry.fields.minus(&diff.removed);
    }
    encode_into(new, entries);
}

/// One field another manager owns that the apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Conflict {
    manager: String,
    path: Vec<String>,
}

/// kube-apiserver's 409 for an apply that conflicts.
fn conflict_error(conflicts: &[Conflict]) -> ApiError {
    let message = if let [one] = conflicts {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            one.manager,
            display_path(&one.path)
        )
    } else {
        let mut by_manager: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for c in conflicts {
            by_manager
                .entry(&c.manager)
                .or_default()
                .push(display_path(&c.path));
        }
        let mut lines = Vec::new();
        for (manager, paths) in by_manager {
            lines.push(format!("conflicts with {manager}:"));
            lines.extend(paths.into_iter().map(|p| format!("- {p}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    let mut e = ApiError::from_code(409, message);
    e.details = Some(Box::new(super::status::Details {
        causes: conflicts
            .iter()
            .map(|c| Cause {
                field: display_path(&c.path),
                message: format!("conflict with {}", c.manager),
            })
            .collect(),
        ..Default::default()
    }));
    e
}

/// The part of an applied configuration an endpoint writes: on `/status` only the status (and
/// the identity), on the main resource of a kind with a status subresource all but the status.
fn scoped_config(info: &ResourceInfo, subresource: &str, config: &Value) -> Value {
    let mut config = config.clone();
    let Some(map) = config.as_object_mut() else {
        return config;
    };
    if subresource == "status" {
        let meta = map.get("metadata").cloned().unwrap_or_else(|| json!({}));
        map.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "status"));
        let identity: Map<String, Value> = ["name", "namespace"]
            .iter()
            .filter_map(|f| meta.get(*f).map(|v| ((*f).to_string(), v.clone())))
            .collect();
        map.insert("metadata".into(), Value::Object(identity));
    } else if info.subresources.contains(&"status") {
        map.remove("status");
    }
    config
}

/// What client-side apply recorded: the fields of the last-applied annotation, which kubectl's
/// first server-side apply may take over without a conflict.
fn last_applied_fields(info: &ResourceInfo, live: &Value) -> Option<FieldSet> {
    let text = live["metadata"]["annotations"][LAST_APPLIED].as_str()?;
    let last: Value = serde_json::from_str(text).ok()?;
    let mut set = FieldSet::default();
    Shape::new(info.kind).applied_fields(&last, &mut set);
    strip(info, "", &mut set);
    Some(set)
}

/// The last-applied annotation kube-apiserver writes for `config` (JSON, keys sorted, the
/// annotation itself left out, a trailing newline).
fn last_applied_value(config: &Value) -> String {
    let mut copy = config.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut)
        && let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut)
    {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.remove("annotations");
        }
    }
    format!("{copy}\n")
}

/// Server-side apply of `config` by `manager` to `live` (`None`: the object does not exist yet
/// and the apply creates it). Returns the object to store, `managedFields` included; when it
/// equals `live`, nothing changed and nothing needs writing.
pub fn apply(
    info: &ResourceInfo,
    subresource: Option<&str>,
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    now: OffsetDateTime,
) -> Result<Value, ApiError> {
    let subresource = subresource.unwrap_or_default();
    let config = scoped_config(info, subresource, config);
    Shape::new(info.kind)
        .check_keys(&config)
        .map_err(ApiError::bad_request)?;
    let live_object = live.map_or_else(|| json!({}), without_managed_fields);
    let mut entries = live.map(decode).unwrap_or_default();
    if live.is_some() && entries.is_empty() {
        // An object written before any manager was recorded: what it holds belongs to
        // `before-first-apply`, as kube-apiserver does on the first apply.
        let diff = changes(info, subresource, &json!({}), &live_object);
        entries.push(Entry {
            manager: BEFORE_FIRST_APPLY.into(),
            operation: Operation::Update,
            api_version: info.api_version(),
            time: None,
            subresource: subresource.to_string(),
            fields: diff.changed(),
        });
    }
    let mut merged = Shape::new(info.kind).merge(&live_object, &config);
    let mut applied = FieldSet::default();
    Shape::new(info.kind).applied_fields(&config, &mut applied);
    strip(info, subresource, &mut applied);
    let mine = |e: &Entry| e.is(manager, Operation::Apply, subresource);
    let previous = entries.iter().find(|e| mine(e)).map(|e| e.fields.clone());
    // Fields applied last time and not now go, unless someone else (or this apply) owns them.
    if let Some(previous) = previous {
        let mut kept = applied.clone();
        for entry in entries.iter().filter(|e| !mine(e)) {
            kept.union(&entry.fields);
        }
        // Parents come before their children: a removed element takes its fields with it.
        let mut removed: Vec<Vec<String>> = Vec::new();
        for path in previous.minus(&applied).paths() {
            if removed.iter().any(|r| path.starts_with(r)) {
                continue;
            }
            if kept.at(&path).is_none_or(FieldSet::is_empty) {
                remove_path(&mut merged, &path);
                removed.push(path);
            }
        }
    }
    if live.is_some() {
        // Keep what the server owns as it was (an apply cannot rename or re-identify).
        for field in [
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "creationTimestamp",
        ] {
            if let Some(v) = live_object["metadata"].get(field) {
                merged["metadata"][field] = v.clone();
            }
        }
    }
    let diff = changes(info, subresource, &live_object, &merged);
    let changed = diff.changed();
    let mut conflicts = Vec::new();
    for entry in entries.iter().filter(|e| !mine(e)) {
        for path in entry.fields.intersect(&changed).paths() {
            conflicts.push(Conflict {
                manager: entry.describe(),
                path,
            });
        }
    }
    let mut force = force;
    if !conflicts.is_empty() && !force && manager == "kubectl" {
        // kubectl's first server-side apply of an object it applied client-side: conflicts
        // over fields of the last-applied configuration are taken over, as kube-apiserver does.
        force = live
            .and_then(|l| last_applied_fields(info, l))
            .is_some_and(|allowed| {
                conflicts
                    .iter()
                    .all(|c| allowed.at(&c.path).is_some_and(|n| n.member))
            });
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(&conflicts));
    }
    let mut taken = changed;
    taken.union(&diff.removed);
    for entry in entries.iter_mut().filter(|e| !mine(e)) {
        entry.fields = entry.fields.minus(&taken);
    }
    let time = (merged != live_object).then(|| timestamp(now));
    match entries.iter_mut().find(|e| mine(e)) {
        Some(entry) => {
            entry.fields = applied;
            if time.is_some() {
                entry.time = time;
            }
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: Operation::Apply,
            api_version: info.api_version(),
            time,
            subresource: subresource.to_string(),
            fields: applied,
        }),
    }
    if manager == "kubectl" && live_object["metadata"]["annotations"][LAST_APPLIED].is_string() {
        merged["metadata"]["annotations"][LAST_APPLIED] = json!(last_applied_value(&config));
    }
    encode_into(&mut merged, entries);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(plural: &str) -> &'static ResourceInfo {
        let (group, version) = match plural {
            "deployments" => ("apps", "v1"),
            _ => ("", "v1"),
        };
        super::super::resources::lookup(group, version, plural).expect("resource")
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time")
    }

    fn fields(object: &Value, manager: &str) -> Value {
        object["metadata"]["managedFields"]
            .as_array()
            .and_then(|l| l.iter().find(|e| e["manager"] == manager))
            .map(|e| e["fieldsV1"].clone())
            .unwrap_or(Value::Null)
    }

    #[test]
    fn fields_v1_round_trips_with_members_marked_by_a_dot() {
        let encoded = json!({
            "f:data": {".": {}, "f:a": {}},
            "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}}}},
            "f:metadata": {"f:finalizers": {"v:\"x\"": {}}},
        });
        let set = FieldSet::from_fields_v1(&encoded).expect("decodes");
        assert_eq!(set.to_fields_v1(), encoded);
        let paths: Vec<String> = set.paths().iter().map(|p| display_path(p)).collect();
        assert_eq!(
            paths,
            [
                ".data",
                ".data.a",
                ".metadata.finalizers[=\"x\"]",
                ".spec.containers[name=\"c\"]",
                ".spec.containers[name=\"c\"].image",
            ]
        );
        assert!(FieldSet::from_fields_v1(&json!([])).is_none());
    }

    #[test]
    fn set_operations_keep_only_members() {
        let a = FieldSet::from_fields_v1(&json!({"f:a": {}, "f:b": {"f:c": {}, "f:d": {}}}))
            .expect("a");
        let b = FieldSet::from_fields_v1(&json!({"f:b": {"f:c": {}}})).expect("b");
        assert_eq!(
            a.minus(&b).to_fields_v1(),
            json!({"f:a": {}, "f:b": {"f:d": {}}})
        );
        assert_eq!(a.intersect(&b).to_fields_v1(), json!({"f:b": {"f:c": {}}}));
        assert!(b.minus(&a).is_empty());
    }

    #[test]
    fn applied_fields_follow_list_types() {
        let config = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{
                            "name": "c", "image": "busybox",
                            "ports": [{"containerPort": 80}],
                            "env": [{"name": "A", "value": "1"}],
                        }],
                        "tolerations": [{"key": "k", "operator": "Exists"}],
                    },
                },
            },
        });
        let mut set = FieldSet::default();
        Shape::new("Deployment").applied_fields(&config, &mut set);
        strip(info("deployments"), "", &mut set);
        // What kube-apiserver v1.36 recorded for the same configuration.
        let expected = json!({
            "f:metadata": {"f:labels": {"f:app": {}}},
            "f:spec": {
                "f:replicas": {},
                "f:selector": {},
                "f:template": {
                    "f:metadata": {"f:labels": {"f:app": {}}},
                    "f:spec": {
                        "f:containers": {"k:{\"name\":\"c\"}": {
                            ".": {},
                            "f:env": {"k:{\"name\":\"A\"}": {".": {}, "f:name": {}, "f:value": {}}},
                            "f:image": {},
                            "f:name": {},
                            "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}},
                        }},
                        "f:tolerations": {},
                    },
                },
            },
        });
        assert_eq!(set.to_fields_v1(), expected);
    }

    #[test]
    fn updates_own_what_they_change_and_take_it_from_others() {
        let cm = info("configmaps");
        let mut created = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "default", "uid": "u"}, "data": {"a": "b"}});
        track_update(
            cm,
            None,
            None,
            &mut created,
            &Value::Null,
            "kubectl-create",
            now(),
        );
        assert_eq!(
            fields(&created, "kubectl-create"),
            json!({"f:data": {".": {}, "f:a": {}}})
        );
        let mut labelled = created.clone();
        labelled["metadata"]["labels"] = json!({"x": "y"});
        track_update(
            cm,
            None,
            Some(&created),
            &mut labelled,
            &Value::Null,
            "kubectl-label",
            now(),
        );
        assert_eq!(
            fields(&labelled, "kubectl-label"),
            json!({"f:metadata": {"f:labels": {".": {}, "f:x": {}}}})
        );
        let mut edited = labelled.clone();
        edited["data"]["a"] = json!("c");
        track_update(
            cm,
            None,
            Some(&labelled),
            &mut edited,
            &Value::Null,
            "kubectl-edit",
            now(),
        );
        assert_eq!(fields(&edited, "kubectl-create"), json!({"f:data": {}}));
        assert_eq!(
            fields(&edited, "kubectl-edit"),
            json!({"f:data": {"f:a": {}}})
        );
        // A write that removes everything a manager owned drops its entry.
        let mut unlabelled = edited.clone();
        unlabelled["metadata"]
            .as_object_mut()
            .expect("meta")
            .remove("labels");
        track_update(
            cm,
            None,
            Some(&edited),
            &mut unlabelled,
            &Value::Null,
            "kubectl-edit",
            now(),
        );
        assert_eq!(fields(&unlabelled, "kubectl-label"), Value::Null);
    }

    #[test]
    fn requested_managed_fields_are_the_starting_point() {
        let cm = info("configmaps");
        let mut live = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c"}, "data": {"a": "b"}});
        track_update(cm, None, None, &mut live, &Value::Null, "one", now());
        let requested = json!([{"manager": "two", "operation": "Apply", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:a": {}}}}]);
        let mut new = live.clone();
        new["metadata"]["managedFields"] = requested.clone();
        track_update(cm, None, Some(&live), &mut new, &requested, "three", now());
        assert_eq!(new["metadata"]["managedFields"], requested);
        // `[{}]` and `[]` clear them, this write's own change included; none keeps them.
        for reset in [json!([{}]), json!([])] {
            let mut cleared = new.clone();
            cleared["data"]["a"] = json!("changed");
            track_update(cm, None, Some(&new), &mut cleared, &reset, "four", now());
            assert!(
                cleared["metadata"].get("managedFields").is_none(),
                "{cleared}"
            );
        }
        let mut kept = new.clone();
        kept["metadata"]
            .as_object_mut()
            .expect("meta")
            .remove("managedFields");
        track_update(cm, None, Some(&new), &mut kept, &Value::Null, "five", now());
        assert_eq!(kept["metadata"]["managedFields"], requested);
    }

    fn apply_cm(
        live: Option<&Value>,
        data: Value,
        manager: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "default"}, "data": data});
        apply(
            info("configmaps"),
            None,
            live,
            &config,
            manager,
            force,
            now(),
        )
    }

    #[test]
    fn apply_conflicts_forces_and_prunes() {
        let first = apply_cm(None, json!({"a": "1", "b": "2"}), "kubectl", false).expect("create");
        assert_eq!(first["data"], json!({"a": "1", "b": "2"}));
        assert_eq!(
            fields(&first, "kubectl"),
            json!({"f:data": {"f:a": {}, "f:b": {}}})
        );
        // Applying the same again changes nothing.
        let again =
            apply_cm(Some(&first), json!({"a": "1", "b": "2"}), "kubectl", false).expect("again");
        assert_eq!(again, first);
        // The same value from another manager is shared, a different one conflicts.
        let shared =
            apply_cm(Some(&first), json!({"a": "1"}), "other", false).expect("shared value");
        assert_eq!(fields(&shared, "other"), json!({"f:data": {"f:a": {}}}));
        let e = apply_cm(Some(&first), json!({"a": "9"}), "other", false).expect_err("conflict");
        assert_eq!((e.code.as_u16(), e.reason), (409, "Conflict"));
        assert_eq!(
            e.message,
            "Apply failed with 1 conflict: conflict with \"kubectl\": .data.a"
        );
        assert_eq!(
            e.causes(),
            [Cause {
                field: ".data.a".into(),
                message: "conflict with \"kubectl\"".into()
            }]
        );
        let forced = apply_cm(Some(&first), json!({"a": "9"}), "other", true).expect("forced");
        assert_eq!(forced["data"]["a"], "9");
        assert_eq!(fields(&forced, "kubectl"), json!({"f:data": {"f:b": {}}}));
        // kubectl no longer applies b: nobody else owns it, so it goes.
        let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"l": "v"}}});
        let pruned = apply(
            info("configmaps"),
            None,
            Some(&forced),
            &config,
            "kubectl",
            false,
            now(),
        )
        .expect("pruned");
        assert_eq!(pruned["data"], json!({"a": "9"}));
        assert_eq!(
            fields(&pruned, "kubectl"),
            json!({"f:metadata": {"f:labels": {"f:l": {}}}})
        );
    }

    #[test]
    fn conflicts_name_update_managers_with_their_api_version() {
        let cm = info("configmaps");
        let mut live = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "default"}, "data": {"a": "b", "z": "z"}});
        track_update(
            cm,
            None,
            None,
            &mut live,
            &Value::Null,
            "kubectl-client-side-apply",
            now(),
        );
        let e = apply_cm(Some(&live), json!({"a": "x", "z": "y"}), "other", false)
            .expect_err("conflict");
        assert_eq!(
            e.message,
            "Apply failed with 2 conflicts: conflicts with \"kubectl-client-side-apply\" using v1:\n- .data.a\n- .data.z"
        );
    }

    #[test]
    fn associative_lists_merge_by_key_and_prune_elements() {
        let deploy = info("deployments");
        let config = |env: Value| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i", "env": env}]}}}})
        };
        let first = apply(
            deploy,
            None,
            None,
            &config(json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])),
            "mgr",
            false,
            now(),
        )
        .expect("first");
        let mut live = first.clone();
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        let second = apply(
            deploy,
            None,
            Some(&live),
            &config(json!([{"name": "B", "value": "3"}])),
            "mgr",
            false,
            now(),
        )
        .expect("second");
        let container = &second["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["env"], json!([{"name": "B", "value": "3"}]));
        assert_eq!(container["imagePullPolicy"], "Always", "{second}");
    }

    #[test]
    fn merged_lists_follow_the_configuration_order() {
        let names = |list: &Value| -> Vec<String> {
            list.as_array()
                .expect("list")
                .iter()
                .map(|e| e["name"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        let containers = |names: &[&str]| -> Value {
            names
                .iter()
                .map(|n| json!({"name": n, "image": "i"}))
                .collect()
        };
        let mut shape = Shape::new("Pod");
        shape.names = vec!["spec".into(), "containers".into()];
        // Live a, x, b, c; the configuration names c, a, d: x (unnamed) keeps its place before
        // b, the named ones follow the configuration, d comes after the one it follows.
        let merged = shape.merge(
            &containers(&["a", "x", "b", "c"]),
            &containers(&["c", "a", "d"]),
        );
        assert_eq!(names(&merged), ["x", "b", "c", "a", "d"]);
        let merged = shape.merge(&containers(&["a", "b"]), &containers(&["a", "n", "b"]));
        assert_eq!(names(&merged), ["a", "n", "b"]);
    }

    #[test]
    fn apply_refuses_elements_without_keys() {
        let config = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"template": {"spec": {"containers": [{"image": "i"}]}}}});
        let e = apply(info("deployments"), None, None, &config, "m", false, now())
            .expect_err("no name");
        assert_eq!(e.code.as_u16(), 400);
        assert!(
            e.message.contains("omits key field \"name\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn patch_options_are_checked_as_kube_apiserver_does() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let e = patch_force(true, &q(&[])).expect_err("no manager");
        assert_eq!(
            e.message,
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
        );
        assert_eq!(e.code.as_u16(), 422);
        let e = patch_force(false, &q(&[("force", "true")])).expect_err("force");
        assert!(
            e.message
                .ends_with("force: Forbidden: may not be specified for non-apply patch")
        );
        assert_eq!(
            patch_force(true, &q(&[("fieldManager", "m"), ("force", "true")])),
            Ok(true)
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::USER_AGENT,
            "kubectl/v1.31.0 (linux/amd64) kubernetes/abc"
                .parse()
                .expect("ua"),
        );
        assert_eq!(field_manager(&q(&[]), &headers), "kubectl");
        assert_eq!(field_manager(&q(&[("fieldManager", "x")]), &headers), "x");
        assert_eq!(field_manager(&q(&[]), &HeaderMap::new()), "unknown");
        let long = "m".repeat(129);
        let e = check_field_manager("CreateOptions", &q(&[("fieldManager", &long)]))
            .expect_err("too long");
        assert_eq!(
            e.message,
            "CreateOptions.meta.k8s.io \"\" is invalid: fieldManager: Too long: may not be more than 128 bytes"
        );
        let e = check_field_manager("UpdateOptions", &q(&[("fieldManager", "a\u{1}b")]))
            .expect_err("control character");
        assert!(
            e.message
                .ends_with("invalid character U+0001 (at position 1)"),
            "{}",
            e.message
        );
        assert_eq!(
            check_field_manager("PatchOptions", &q(&[("fieldManager", "ok")])),
            Ok(())
        );
    }
}
