//! The resource table of the embedded control plane (kinds, scopes, verbs, subresources), label
//! and field selectors, and server-side printing: the `meta.k8s.io/v1` Tables `kubectl get` asks
//! for.
//!
//! Everything here is pure: objects come in as `serde_json::Value`, time comes in as `now`.
//! The printing rules follow the apiserver's table printers (`pkg/printers/internalversion`) so
//! `kubectl get` looks the same against this server as against a cluster; docs/kubectl-compat.md
//! lists the sources.

mod service_printers;
mod workload_printers;

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value, json};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// One servable resource: a group/version/kind, its URL name, scope, verbs and subresources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResourceInfo {
    /// API group; `""` is the core group (served under `/api`).
    pub group: &'static str,
    /// API version, e.g. `v1`.
    pub version: &'static str,
    /// Kind of the objects, e.g. `Pod`.
    pub kind: &'static str,
    /// Resource name in URLs, e.g. `pods`.
    pub plural: &'static str,
    /// Lower-case singular name, e.g. `pod`.
    pub singular: &'static str,
    /// Short names kubectl accepts, e.g. `po`.
    pub short_names: &'static [&'static str],
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Verbs on the resource itself (discovery `verbs`).
    pub verbs: &'static [&'static str],
    /// Subresources served, e.g. `["status"]` (each is discovered as `plural/sub`).
    pub subresources: &'static [&'static str],
    /// Categories, e.g. `all` (so `kubectl get all` includes the resource).
    pub categories: &'static [&'static str],
}

impl ResourceInfo {
    /// The `apiVersion` of objects of this resource: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether `name` is a subresource served for this resource.
    pub fn has_subresource(&self, name: &str) -> bool {
        self.subresources.contains(&name)
    }
}

/// Verbs of a resource that supports everything the apiserver offers on a collection.
const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Namespaces cannot be deleted as a collection.
const NAMESPACE_VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
/// Verbs of a `status` subresource.
pub const STATUS_VERBS: &[&str] = &["get", "patch", "update"];
/// The streaming subresources of pods, served by `apiserver::streaming` rather than by the
/// object handler: name, kind and verbs as kube-apiserver lists them in discovery.
pub const POD_STREAM_SUBRESOURCES: &[(&str, &str, &[&str])] = &[
    ("attach", "PodAttachOptions", &["create", "get"]),
    ("exec", "PodExecOptions", &["create", "get"]),
    ("log", "Pod", &["get"]),
    ("portforward", "PodPortForwardOptions", &["create", "get"]),
];

static BUILTIN: [ResourceInfo; 19] = [
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        verbs: NAMESPACE_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        short_names: &["no"],
        namespaced: false,
        verbs: ALL_VERBS,
        subresources: &["status"],
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status", "binding"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        short_names: &["cm"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        short_names: &[],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        short_names: &["sa"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        short_names: &["svc"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "",
        version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        short_names: &["ep"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        short_names: &["deploy"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status", "scale"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        short_names: &["rs"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status", "scale"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "DaemonSet",
        plural: "daemonsets",
        singular: "daemonset",
        short_names: &["ds"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "StatefulSet",
        plural: "statefulsets",
        singular: "statefulset",
        short_names: &["sts"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status", "scale"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "apps",
        version: "v1",
        kind: "ControllerRevision",
        plural: "controllerrevisions",
        singular: "controllerrevision",
        short_names: &[],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "batch",
        version: "v1",
        kind: "Job",
        plural: "jobs",
        singular: "job",
        short_names: &[],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "batch",
        version: "v1",
        kind: "CronJob",
        plural: "cronjobs",
        singular: "cronjob",
        short_names: &["cj"],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &["status"],
        categories: &["all"],
    },
    ResourceInfo {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        short_names: &[],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        short_names: &[],
        namespaced: true,
        verbs: ALL_VERBS,
        subresources: &[],
        categories: &[],
    },
    ResourceInfo {
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        short_names: &["crd", "crds"],
        namespaced: false,
        verbs: ALL_VERBS,
        subresources: &["status"],
        categories: &["api-extensions"],
    },
];

/// Every built-in resource, core group first (the order discovery lists them in).
///
/// `events.k8s.io/v1` is not served: kubectl (`get events`, `describe`, `events`) reads core
/// `v1` events, and serving both would need conversion between their schemas.
pub fn builtin() -> &'static [ResourceInfo] {
    &BUILTIN
}

/// The resource at `group`/`version` with URL name `plural`: a built-in, else a served custom
/// resource ([`super::crd`]).
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    BUILTIN
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
        .or_else(|| super::crd::lookup(group, version, plural))
}

/// The resource serving `kind` in `group`/`version`: a built-in, else a served custom resource.
pub fn lookup_kind(group: &str, version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    BUILTIN
        .iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind)
        .or_else(|| super::crd::lookup_kind(group, version, kind))
}

// ---------------------------------------------------------------------------------------------
// Field values
// ---------------------------------------------------------------------------------------------

/// The value at a dotted path as a selector compares it: strings as they are, booleans and
/// numbers in their JSON spelling, absent or null as `""`.
fn path_text(object: &Value, path: &[&str]) -> String {
    let mut at = object;
    for key in path {
        match at.get(key) {
            Some(next) => at = next,
            None => return String::new(),
        }
    }
    match at {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Like [`path_text`], but `default` when the field is absent or empty: the value the apiserver's
/// defaulting would have stored.
fn path_text_or(object: &Value, path: &[&str], default: &str) -> String {
    let value = path_text(object, path);
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

/// A boolean field in Go's `%v` spelling; absent is `false`.
fn path_bool(object: &Value, path: &[&str]) -> String {
    let mut at = object;
    for key in path {
        at = &at[key];
    }
    at.as_bool().unwrap_or(false).to_string()
}

/// Field selector support: the value of a selectable field of an object, or `None` if the field
/// is not selectable for this kind (the request then fails with 400 "field label not
/// supported").
///
/// `metadata.name` and `metadata.namespace` work for every kind (cluster-scoped objects have an
/// empty namespace). The kind-specific fields are the ones the apiserver registers for field
/// selectors; where the apiserver defaults a field at creation (a pod's `restartPolicy` and
/// `schedulerName`, a secret's `type`, a namespace's `status.phase`) an absent value reads as
/// that default.
pub fn field_value(kind: &str, field: &str, object: &Value) -> Option<String> {
    match field {
        "metadata.name" => return Some(path_text(object, &["metadata", "name"])),
        "metadata.namespace" => return Some(path_text(object, &["metadata", "namespace"])),
        _ => {}
    }
    let value = match (kind, field) {
        ("Pod", "spec.nodeName") => path_text(object, &["spec", "nodeName"]),
        ("Pod", "spec.restartPolicy") => path_text_or(object, &["spec", "restartPolicy"], "Always"),
        ("Pod", "spec.schedulerName") => {
            path_text_or(object, &["spec", "schedulerName"], "default-scheduler")
        }
        ("Pod", "spec.serviceAccountName") => path_text(object, &["spec", "serviceAccountName"]),
        ("Pod", "spec.hostNetwork") => path_bool(object, &["spec", "hostNetwork"]),
        ("Pod", "status.phase") => path_text(object, &["status", "phase"]),
        ("Pod", "status.podIP") => path_text(object, &["status", "podIP"]),
        ("Pod", "status.nominatedNodeName") => path_text(object, &["status", "nominatedNodeName"]),
        ("Event", "involvedObject.kind") => path_text(object, &["involvedObject", "kind"]),
        ("Event", "involvedObject.namespace") => {
            path_text(object, &["involvedObject", "namespace"])
        }
        ("Event", "involvedObject.name") => path_text(object, &["involvedObject", "name"]),
        ("Event", "involvedObject.uid") => path_text(object, &["involvedObject", "uid"]),
        ("Event", "involvedObject.apiVersion") => {
            path_text(object, &["involvedObject", "apiVersion"])
        }
        ("Event", "involvedObject.resourceVersion") => {
            path_text(object, &["involvedObject", "resourceVersion"])
        }
        ("Event", "involvedObject.fieldPath") => {
            path_text(object, &["involvedObject", "fieldPath"])
        }
        ("Event", "reason") => path_text(object, &["reason"]),
        ("Event", "reportingComponent") => path_text(object, &["reportingComponent"]),
        ("Event", "type") => path_text(object, &["type"]),
        ("Event", "source") => {
            let component = path_text(object, &["source", "component"]);
            if component.is_empty() {
                path_text(object, &["reportingComponent"])
            } else {
                component
            }
        }
        ("Secret", "type") => path_text_or(object, &["type"], "Opaque"),
        ("Node", "spec.unschedulable") => path_bool(object, &["spec", "unschedulable"]),
        ("Namespace", "status.phase") => path_text_or(object, &["status", "phase"], "Active"),
        // kube-apiserver's Job field: the count of succeeded pods, `0` when absent.
        ("Job", "status.successful") => path_text_or(object, &["status", "succeeded"], "0"),
        // kube-apiserver 1.31+: a Service's cluster IP and type.
        ("Service", "spec.clusterIP") => path_text(object, &["spec", "clusterIP"]),
        ("Service", "spec.type") => path_text_or(object, &["spec", "type"], "ClusterIP"),
        _ => return None,
    };
    Some(value)
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

/// A label or field selector could not be parsed, or names a field the kind does not support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The label selector does not follow the grammar.
    #[error("unable to parse requirement {part:?} in label selector {selector:?}: {reason}")]
    LabelSyntax {
        selector: String,
        part: String,
        reason: String,
    },
    /// A label key is not a valid qualified name.
    #[error("invalid label key {key:?}: {reason}")]
    LabelKey { key: String, reason: String },
    /// A label value is not valid.
    #[error("invalid label value {value:?} for key {key:?}: {reason}")]
    LabelValue {
        key: String,
        value: String,
        reason: String,
    },
    /// A field selector term has no operator or no field name.
    #[error("invalid field selector {selector:?}: cannot understand {part:?}")]
    FieldSyntax { selector: String, part: String },
    /// A field selector value has a backslash that escapes nothing it may escape.
    #[error("invalid escape sequence in field selector value {value:?}")]
    FieldEscape { value: String },
    /// The field cannot be selected on for this kind.
    #[error("field label not supported: {field}")]
    UnsupportedField { kind: String, field: String },
}

/// How a label requirement compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOperator {
    /// `key=value` or `key==value`.
    Equals,
    /// `key!=value` (also true when the key is absent).
    NotEquals,
    /// `key in (a,b)`.
    In,
    /// `key notin (a,b)` (also true when the key is absent).
    NotIn,
    /// `key`.
    Exists,
    /// `!key`.
    DoesNotExist,
    /// `key>5` (integer comparison).
    GreaterThan,
    /// `key<5` (integer comparison).
    LessThan,
}

/// One requirement of a label selector; all requirements must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    /// The label key.
    pub key: String,
    /// How the label's value is compared.
    pub operator: LabelOperator,
    /// The values compared against (empty for `Exists`/`DoesNotExist`, one for `=`, `!=`, `>`,
    /// `<`).
    pub values: Vec<String>,
}

impl LabelRequirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
            LabelOperator::Equals | LabelOperator::In => {
                value.is_some_and(|v| self.values.iter().any(|w| w == v))
            }
            LabelOperator::NotEquals | LabelOperator::NotIn => {
                value.is_none_or(|v| self.values.iter().all(|w| w != v))
            }
            LabelOperator::GreaterThan | LabelOperator::LessThan => {
                let (Some(actual), Some(bound)) = (
                    value.and_then(|v| v.parse::<i64>().ok()),
                    self.values.first().and_then(|v| v.parse::<i64>().ok()),
                ) else {
                    return false;
                };
                if self.operator == LabelOperator::GreaterThan {
                    actual > bound
                } else {
                    actual < bound
                }
            }
        }
    }
}

/// A parsed label selector (`app=web,tier!=db,env in (a,b),!legacy`); empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// A token of the label selector grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelToken {
    Identifier(String),
    In,
    NotIn,
    OpenParen,
    CloseParen,
    Comma,
    Equals,
    DoubleEquals,
    NotEquals,
    Bang,
    Greater,
    Less,
}

impl fmt::Display for LabelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            LabelToken::Identifier(s) => s.as_str(),
            LabelToken::In => "in",
            LabelToken::NotIn => "notin",
            LabelToken::OpenParen => "(",
            LabelToken::CloseParen => ")",
            LabelToken::Comma => ",",
            LabelToken::Equals => "=",
            LabelToken::DoubleEquals => "==",
            LabelToken::NotEquals => "!=",
            LabelToken::Bang => "!",
            LabelToken::Greater => ">",
            LabelToken::Less => "<",
        };
        f.write_str(text)
    }
}

fn is_label_special(c: char) -> bool {
    matches!(c, '!' | '=' | ',' | '(' | ')' | '<' | '>') || c.is_whitespace()
}

fn label_tokens(selector: &str) -> Vec<LabelToken> {
    let mut tokens = Vec::new();
    let mut chars = selector.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let token = match c {
            '(' => LabelToken::OpenParen,
            ')' => LabelToken::CloseParen,
            ',' => LabelToken::Comma,
            '>' => LabelToken::Greater,
            '<' => LabelToken::Less,
            '=' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(LabelToken::DoubleEquals);
                } else {
                    tokens.push(LabelToken::Equals);
                }
                continue;
            }
            '!' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(LabelToken::NotEquals);
                } else {
                    tokens.push(LabelToken::Bang);
                }
                continue;
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if is_label_special(c) {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(match word.as_str() {
                    "in" => LabelToken::In,
                    "notin" => LabelToken::NotIn,
                    _ => LabelToken::Identifier(word),
                });
                continue;
            }
        };
        chars.next();
        tokens.push(token);
    }
    tokens
}

/// `[prefix/]name` where the prefix is a DNS subdomain and the name is at most 63 characters of
/// alphanumerics, `-`, `_` and `.`, starting and ending alphanumeric.
fn validate_label_key(key: &str) -> Result<(), SelectorError> {
    let fail = |reason: &str| SelectorError::LabelKey {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !valid {
            return Err(fail(
                "the prefix must be a DNS subdomain (lower case, at most 253 characters)",
            ));
        }
    }
    if name.is_empty() {
        return Err(fail("the name part must not be empty"));
    }
    if !is_label_name(name) {
        return Err(fail(
            "the name part must be at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric",
        ));
    }
    Ok(())
}

fn is_label_name(name: &str) -> bool {
    name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn validate_label_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || is_label_name(value) {
        return Ok(());
    }
    Err(SelectorError::LabelValue {
        key: key.to_string(),
        value: value.to_string(),
        reason: "a value must be empty or at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
            .to_string(),
    })
}

/// A cursor over label selector tokens that knows how to report errors.
struct LabelParser<'a> {
    selector: &'a str,
    tokens: Vec<LabelToken>,
    at: usize,
}

impl LabelParser<'_> {
    fn peek(&self) -> Option<&LabelToken> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<LabelToken> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn error(&self, part: &str, reason: impl Into<String>) -> SelectorError {
        SelectorError::LabelSyntax {
            selector: self.selector.to_string(),
            part: part.to_string(),
            reason: reason.into(),
        }
    }

    fn requirement(&mut self) -> Result<LabelRequirement, SelectorError> {
        let negated = self.peek() == Some(&LabelToken::Bang);
        if negated {
            self.next();
        }
        let key = match self.next() {
            Some(LabelToken::Identifier(key)) => key,
            Some(other) => {
                return Err(self.error(&other.to_string(), "expected a label key"));
            }
            None => return Err(self.error("", "expected a label key at the end")),
        };
        validate_label_key(&key)?;
        if negated {
            return Ok(LabelRequirement {
                key,
                operator: LabelOperator::DoesNotExist,
                values: Vec::new(),
            });
        }
        let operator = match self.peek() {
            None | Some(LabelToken::Comma) => {
                return Ok(LabelRequirement {
                    key,
                    operator: LabelOperator::Exists,
                    values: Vec::new(),
                });
            }
            Some(LabelToken::Equals | LabelToken::DoubleEquals) => LabelOperator::Equals,
            Some(LabelToken::NotEquals) => LabelOperator::NotEquals,
            Some(LabelToken::In) => LabelOperator::In,
            Some(LabelToken::NotIn) => LabelOperator::NotIn,
            Some(LabelToken::Greater) => LabelOperator::GreaterThan,
            Some(LabelToken::Less) => LabelOperator::LessThan,
            Some(other) => {
                let part = format!("{key} {other}");
                return Err(self.error(&part, "expected one of =, ==, !=, in, notin, >, <"));
            }
        };
        self.next();
        let values = match operator {
            LabelOperator::In | LabelOperator::NotIn => self.value_set(&key)?,
            _ => vec![self.single_value(&key)?],
        };
        if matches!(
            operator,
            LabelOperator::GreaterThan | LabelOperator::LessThan
        ) && values[0].parse::<i64>().is_err()
        {
            return Err(self.error(&format!("{key}{values:?}"), "> and < need an integer value"));
        }
        for value in &values {
            validate_label_value(&key, value)?;
        }
        Ok(LabelRequirement {
            key,
            operator,
            values,
        })
    }

    /// The value after `=`, `==`, `!=`, `>` or `<`; absent (`key=`) is the empty value.
    fn single_value(&mut self, key: &str) -> Result<String, SelectorError> {
        match self.peek() {
            None | Some(LabelToken::Comma) => Ok(String::new()),
            Some(LabelToken::Identifier(_)) => match self.next() {
                Some(LabelToken::Identifier(value)) => Ok(value),
                _ => Ok(String::new()),
            },
            // `in` and `notin` are also valid values.
            Some(LabelToken::In) => {
                self.next();
                Ok("in".to_string())
            }
            Some(LabelToken::NotIn) => {
                self.next();
                Ok("notin".to_string())
            }
            Some(other) => Err(self.error(&format!("{key}{other}"), "expected a value")),
        }
    }

    /// `( a, b, c )` after `in` or `notin`.
    fn value_set(&mut self, key: &str) -> Result<Vec<String>, SelectorError> {
        if self.next() != Some(LabelToken::OpenParen) {
            return Err(self.error(key, "expected '(' after in/notin"));
        }
        let mut values = Vec::new();
        let mut expect_value = true;
        loop {
            match self.next() {
                Some(LabelToken::CloseParen) => {
                    if expect_value && !values.is_empty() {
                        // `(a,)` has an empty last value, as in the apiserver.
                        values.push(String::new());
                    }
                    break;
                }
                Some(LabelToken::Comma) => {
                    if expect_value {
                        values.push(String::new());
                    }
                    expect_value = true;
                }
                Some(LabelToken::Identifier(value)) if expect_value => {
                    values.push(value);
                    expect_value = false;
                }
                Some(LabelToken::In) if expect_value => {
                    values.push("in".to_string());
                    expect_value = false;
                }
                Some(LabelToken::NotIn) if expect_value => {
                    values.push("notin".to_string());
                    expect_value = false;
                }
                Some(other) => {
                    return Err(
                        self.error(&format!("{key} ({other}"), "expected a value, ',' or ')'")
                    );
                }
                None => return Err(self.error(key, "missing ')'")),
            }
        }
        if values.is_empty() {
            return Err(self.error(key, "in and notin need at least one value"));
        }
        Ok(values)
    }
}

impl LabelSelector {
    /// Parses the `labelSelector` query parameter syntax: requirements separated by commas, each
    /// one of `key`, `!key`, `key=v`, `key==v`, `key!=v`, `key in (v1,v2)`, `key notin (v1,v2)`,
    /// `key>n`, `key<n`. Whitespace around tokens is ignored.
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let mut parser = LabelParser {
            selector,
            tokens: label_tokens(selector),
            at: 0,
        };
        let mut requirements = Vec::new();
        if parser.tokens.is_empty() {
            return Ok(LabelSelector { requirements });
        }
        loop {
            requirements.push(parser.requirement()?);
            match parser.next() {
                None => break,
                Some(LabelToken::Comma) => continue,
                Some(other) => {
                    return Err(
                        parser.error(&other.to_string(), "expected ',' between requirements")
                    );
                }
            }
        }
        Ok(LabelSelector { requirements })
    }

    /// The parsed requirements (all must hold).
    pub fn requirements(&self) -> &[LabelRequirement] {
        &self.requirements
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether `object` (its `metadata.labels`) is selected.
    pub fn matches_object(&self, object: &Value) -> bool {
        self.matches(&object_labels(object))
    }
}

/// The `metadata.labels` of an object as a map (non-string values are ignored).
pub fn object_labels(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// How a field requirement compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldOperator {
    /// `field=value` or `field==value`.
    Equals,
    /// `field!=value`.
    NotEquals,
}

/// One term of a field selector; all terms must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    /// The field path, e.g. `spec.nodeName`.
    pub field: String,
    /// Equal or not equal.
    pub operator: FieldOperator,
    /// The value with escapes (`\,` `\=` `\\`) resolved.
    pub value: String,
}

/// A parsed field selector (`spec.nodeName=edge-1,status.phase!=Failed`); empty selects
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

/// Splits on commas that are not escaped with a backslash.
fn split_field_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in selector.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            terms.push(&selector[start..i]);
            start = i + 1;
        }
    }
    terms.push(&selector[start..]);
    terms
}

fn unescape_field_value(value: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(e @ ('\\' | ',' | '=')) => out.push(e),
            _ => {
                return Err(SelectorError::FieldEscape {
                    value: value.to_string(),
                });
            }
        }
    }
    Ok(out)
}

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter syntax: terms separated by commas (AND), each
    /// `field=value`, `field==value` or `field!=value`; `\,`, `\=` and `\\` escape in values.
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in split_field_terms(selector) {
            if term.is_empty() {
                continue;
            }
            let syntax = || SelectorError::FieldSyntax {
                selector: selector.to_string(),
                part: term.to_string(),
            };
            // The first operator from the left wins, `!=` and `==` before `=`.
            let (at, operator, len) = term
                .char_indices()
                .find_map(|(i, _)| {
                    let rest = &term[i..];
                    if rest.starts_with("!=") {
                        Some((i, FieldOperator::NotEquals, 2))
                    } else if rest.starts_with("==") {
                        Some((i, FieldOperator::Equals, 2))
                    } else if rest.starts_with('=') {
                        Some((i, FieldOperator::Equals, 1))
                    } else {
                        None
                    }
                })
                .ok_or_else(syntax)?;
            let field = term[..at].trim();
            if field.is_empty() {
                return Err(syntax());
            }
            requirements.push(FieldRequirement {
                field: field.to_string(),
                operator,
                value: unescape_field_value(&term[at + len..])?,
            });
        }
        Ok(FieldSelector { requirements })
    }

    /// The parsed terms (all must hold).
    pub fn requirements(&self) -> &[FieldRequirement] {
        &self.requirements
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Checks that every field is selectable for `kind`, without an object: the apiserver
    /// rejects an unsupported field even when nothing would be listed.
    pub fn validate(&self, kind: &str) -> Result<(), SelectorError> {
        let empty = Value::Object(Map::new());
        for r in &self.requirements {
            if field_value(kind, &r.field, &empty).is_none() {
                return Err(SelectorError::UnsupportedField {
                    kind: kind.to_string(),
                    field: r.field.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether `object` of `kind` is selected; an error if a field is not selectable for `kind`.
    pub fn matches(&self, kind: &str, object: &Value) -> Result<bool, SelectorError> {
        let mut selected = true;
        for r in &self.requirements {
            let actual = field_value(kind, &r.field, object).ok_or_else(|| {
                SelectorError::UnsupportedField {
                    kind: kind.to_string(),
                    field: r.field.clone(),
                }
            })?;
            let equal = actual == r.value;
            selected &= match r.operator {
                FieldOperator::Equals => equal,
                FieldOperator::NotEquals => !equal,
            };
        }
        Ok(selected)
    }
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// Parses the RFC 3339 timestamps Kubernetes writes (`2024-05-01T10:00:00Z`, with optional
/// fraction and numeric offset).
pub fn parse_timestamp(text: &str) -> Option<OffsetDateTime> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = text.get(range)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    if !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = i32::try_from(number(0..4)?).ok()?;
    let month = Month::try_from(u8::try_from(number(5..7)?).ok()?).ok()?;
    let day = u8::try_from(number(8..10)?).ok()?;
    let hour = u8::try_from(number(11..13)?).ok()?;
    let minute = u8::try_from(number(14..16)?).ok()?;
    let second = u8::try_from(number(17..19)?).ok()?;
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &fraction[..digits.min(9)];
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - u32::try_from(kept.len()).ok()?);
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => UtcOffset::UTC,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1i8,
                b'-' => -1i8,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let hours = i8::try_from(rest[1..3].parse::<u8>().ok()?).ok()?;
            let minutes = i8::try_from(rest[4..6].parse::<u8>().ok()?).ok()?;
            UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()?
        }
    };
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let time = Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_offset(offset))
}

/// Formats a time as the apiserver does (`2024-05-01T10:00:00Z`, UTC, whole seconds).
pub fn format_timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// A duration the way kubectl prints ages: about two significant units (`45s`, `3m12s`, `25m`,
/// `4h10m`, `20h`, `2d3h`, `30d`, `2y45d`, `10y`).
pub fn human_duration(d: time::Duration) -> String {
    let seconds = d.whole_seconds();
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    if seconds < 0 {
        return "0s".to_string();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = d.whole_minutes();
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = d.whole_hours();
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{days}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// Time since a timestamp field as kubectl shows it; `<unknown>` when absent or unparsable.
fn since(timestamp: &Value, now: OffsetDateTime) -> String {
    match timestamp.as_str().and_then(parse_timestamp) {
        Some(at) => human_duration(now - at),
        None => "<unknown>".to_string(),
    }
}

fn has_timestamp(value: &Value) -> bool {
    value.as_str().and_then(parse_timestamp).is_some()
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

/// Which object each Table row carries (`includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// No object.
    None,
    /// A `PartialObjectMetadata` with the object's metadata: the apiserver's default and what
    /// plain `kubectl get` relies on (namespace column, `--show-labels`, `-L`).
    #[default]
    Metadata,
    /// The whole object (kubectl asks for this with `--sort-by`).
    Object,
}

impl IncludeObject {
    /// Parses the `includeObject` query value (`None`, `Metadata`, `Object`).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "None" => Some(IncludeObject::None),
            "Metadata" => Some(IncludeObject::Metadata),
            "Object" => Some(IncludeObject::Object),
            _ => None,
        }
    }
}

/// Options of a Table response beyond the objects themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableOptions {
    /// What each row's `object` holds.
    pub include_object: IncludeObject,
    /// Leave out `columnDefinitions` (`TableOptions.noHeaders`).
    pub no_headers: bool,
}

/// One column of a Table.
struct Column {
    name: &'static str,
    kind: &'static str,
    format: &'static str,
    /// 0: always shown; 1: only with `-o wide`.
    priority: u8,
    description: &'static str,
}

const fn column(name: &'static str, kind: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind,
        format: "",
        priority: 0,
        description,
    }
}

const fn wide(name: &'static str, kind: &'static str, description: &'static str) -> Column {
    Column {
        name,
        kind,
        format: "",
        priority: 1,
        description,
    }
}

const NAME: Column = Column {
    name: "Name",
    kind: "string",
    format: "name",
    priority: 0,
    description: "Name of the object, unique within its namespace (or the cluster for cluster-scoped kinds).",
};
const AGE: Column = column(
    "Age",
    "string",
    "Time since the server created the object (metadata.creationTimestamp).",
);

const POD_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Ready",
        "string",
        "Ready containers out of all containers of the pod.",
    ),
    column(
        "Status",
        "string",
        "The pod's condition summed up from its phase and its containers' states.",
    ),
    column(
        "Restarts",
        "string",
        "Container restarts in the pod, and how long ago the last one was.",
    ),
    AGE,
    wide("IP", "string", "The pod's first IP address."),
    wide("Node", "string", "The node the pod is bound to."),
    wide(
        "Nominated Node",
        "string",
        "The node a preempting scheduler nominated for the pod.",
    ),
    wide(
        "Readiness Gates",
        "string",
        "Readiness gates that are true, out of all readiness gates.",
    ),
];
const NODE_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Status",
        "string",
        "Ready, NotReady or Unknown, and SchedulingDisabled when cordoned.",
    ),
    column(
        "Roles",
        "string",
        "Roles from the node's node-role.kubernetes.io/<role> labels.",
    ),
    AGE,
    column("Version", "string", "Kubelet version the node reports."),
    wide(
        "Internal-IP",
        "string",
        "The node's first InternalIP address.",
    ),
    wide(
        "External-IP",
        "string",
        "The node's first ExternalIP address.",
    ),
    wide(
        "OS-Image",
        "string",
        "Operating system image the node reports.",
    ),
    wide(
        "Kernel-Version",
        "string",
        "Kernel version the node reports.",
    ),
    wide(
        "Container-Runtime",
        "string",
        "Container runtime and version the node reports.",
    ),
];
const CONFIGMAP_COLUMNS: &[Column] = &[
    NAME,
    column("Data", "string", "Number of keys in data and binaryData."),
    AGE,
];
const SECRET_COLUMNS: &[Column] = &[
    NAME,
    column("Type", "string", "Secret type, e.g. Opaque."),
    column("Data", "string", "Number of keys in data."),
    AGE,
];
const NAMESPACE_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Status",
        "string",
        "Namespace phase: Active or Terminating.",
    ),
    AGE,
];
const EVENT_COLUMNS: &[Column] = &[
    column(
        "Last Seen",
        "string",
        "Time since the event was last observed.",
    ),
    column("Type", "string", "Normal or Warning."),
    column(
        "Reason",
        "string",
        "Short machine-readable reason for the event.",
    ),
    column(
        "Object",
        "string",
        "The object the event is about, as kind/name.",
    ),
    wide(
        "Subobject",
        "string",
        "Field path within the object, e.g. a container.",
    ),
    wide(
        "Source",
        "string",
        "Component (and host) that reported the event.",
    ),
    column(
        "Message",
        "string",
        "Human-readable description of the event.",
    ),
    wide(
        "First Seen",
        "string",
        "Time since the event was first observed.",
    ),
    wide("Count", "string", "How many times the event was observed."),
    Column {
        name: "Name",
        kind: "string",
        format: "name",
        priority: 1,
        description: "Name of the event object.",
    },
];
const LEASE_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Holder",
        "string",
        "Identity of the current holder of the lease.",
    ),
    AGE,
];
/// The apiserver's default table (custom resources, CRDs, anything without a printer).
const DEFAULT_COLUMNS: &[Column] = &[
    NAME,
    column(
        "Created At",
        "date",
        "When the server created the object (metadata.creationTimestamp).",
    ),
];

fn columns_of(kind: &str) -> &'static [Column] {
    if let Some(columns) = workload_printers::columns(kind) {
        return columns;
    }
    if let Some(columns) = service_printers::columns(kind) {
        return columns;
    }
    match kind {
        "Pod" => POD_COLUMNS,
        "Node" => NODE_COLUMNS,
        "ConfigMap" => CONFIGMAP_COLUMNS,
        "Secret" => SECRET_COLUMNS,
        "Namespace" => NAMESPACE_COLUMNS,
        "Event" => EVENT_COLUMNS,
        "Lease" => LEASE_COLUMNS,
        _ => DEFAULT_COLUMNS,
    }
}

fn str_of<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut at = value;
    for key in path {
        at = &at[key];
    }
    at.as_str().unwrap_or_default()
}

fn or_placeholder(text: &str, placeholder: &str) -> String {
    if text.is_empty() {
        placeholder.to_string()
    } else {
        text.to_string()
    }
}

fn array<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    let mut at = value;
    for key in path {
        at = &at[key];
    }
    at.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn count_keys(value: &Value) -> i64 {
    value
        .as_object()
        .map_or(0, |m| i64::try_from(m.len()).unwrap_or(i64::MAX))
}

/// A pod row's cells and, for finished pods, its row conditions.
fn pod_cells(pod: &Value, now: OffsetDateTime) -> (Vec<Value>, Option<Value>) {
    let spec = &pod["spec"];
    let status = &pod["status"];
    let phase = str_of(status, &["phase"]);
    let mut reason = or_placeholder(str_of(status, &["reason"]), phase);
    if array(status, &["conditions"])
        .iter()
        .any(|c| c["type"] == "PodScheduled" && c["reason"] == "SchedulingGated")
    {
        reason = "SchedulingGated".to_string();
    }
    let conditions = match phase {
        "Succeeded" => Some(json!([{
            "type": "Completed", "status": "True", "reason": "Succeeded",
            "message": "all containers of the pod terminated successfully",
        }])),
        "Failed" => Some(json!([{
            "type": "Completed", "status": "True", "reason": "Failed",
            "message": "the pod terminated with a failure",
        }])),
        _ => None,
    };

    let init_specs = array(spec, &["initContainers"]);
    // A sidecar is an init container with restartPolicy Always: it counts as a container.
    let is_sidecar = |name: &str| {
        init_specs
            .iter()
            .any(|c| c["name"] == name && c["restartPolicy"] == "Always")
    };
    let total = array(spec, &["containers"]).len()
        + init_specs
            .iter()
            .filter(|c| c["restartPolicy"] == "Always")
            .count();
    let mut ready = 0usize;
    let mut restarts = 0i64;
    let mut sidecar_restarts = 0i64;
    let mut last_restart: Option<OffsetDateTime> = None;
    let mut last_sidecar_restart: Option<OffsetDateTime> = None;
    let later = |a: Option<OffsetDateTime>, b: Option<OffsetDateTime>| match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let finished_at = |c: &Value| {
        c["lastState"]["terminated"]["finishedAt"]
            .as_str()
            .and_then(parse_timestamp)
    };

    let init_statuses = array(status, &["initContainerStatuses"]);
    let mut initializing = false;
    for (i, c) in init_statuses.iter().enumerate() {
        let name = str_of(c, &["name"]);
        restarts += c["restartCount"].as_i64().unwrap_or(0);
        last_restart = later(last_restart, finished_at(c));
        let sidecar = is_sidecar(name);
        if sidecar {
            sidecar_restarts += c["restartCount"].as_i64().unwrap_or(0);
            last_sidecar_restart = later(last_sidecar_restart, finished_at(c));
        }
        let terminated = &c["state"]["terminated"];
        let waiting_reason = str_of(c, &["state", "waiting", "reason"]);
        if terminated.is_object() && terminated["exitCode"].as_i64().unwrap_or(0) == 0 {
            continue;
        }
        if sidecar && c["started"].as_bool() == Some(true) {
            if c["ready"].as_bool() == Some(true) {
                ready += 1;
            }
            continue;
        }
        if terminated.is_object() {
            let terminated_reason = str_of(terminated, &["reason"]);
            reason = if !terminated_reason.is_empty() {
                format!("Init:{terminated_reason}")
            } else if terminated["signal"].as_i64().unwrap_or(0) != 0 {
                format!("Init:Signal:{}", terminated["signal"].as_i64().unwrap_or(0))
            } else {
                format!(
                    "Init:ExitCode:{}",
                    terminated["exitCode"].as_i64().unwrap_or(0)
                )
            };
        } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
            reason = format!("Init:{waiting_reason}");
        } else {
            reason = format!("Init:{i}/{}", init_specs.len());
        }
        initializing = true;
        break;
    }

    let initialized = array(status, &["conditions"])
        .iter()
        .any(|c| c["type"] == "Initialized" && c["status"] == "True");
    if !initializing || initialized {
        restarts = sidecar_restarts;
        last_restart = last_sidecar_restart;
        let mut has_running = false;
        for c in array(status, &["containerStatuses"]).iter().rev() {
            restarts += c["restartCount"].as_i64().unwrap_or(0);
            last_restart = later(last_restart, finished_at(c));
            let state = &c["state"];
            let waiting_reason = str_of(state, &["waiting", "reason"]);
            let terminated = &state["terminated"];
            if !waiting_reason.is_empty() {
                reason = waiting_reason.to_string();
            } else if terminated.is_object() {
                let terminated_reason = str_of(terminated, &["reason"]);
                reason = if !terminated_reason.is_empty() {
                    terminated_reason.to_string()
                } else if terminated["signal"].as_i64().unwrap_or(0) != 0 {
                    format!("Signal:{}", terminated["signal"].as_i64().unwrap_or(0))
                } else {
                    format!("ExitCode:{}", terminated["exitCode"].as_i64().unwrap_or(0))
                };
            } else if c["ready"].as_bool() == Some(true) && state["running"].is_object() {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let pod_ready = array(status, &["conditions"])
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            reason = if pod_ready { "Running" } else { "NotReady" }.to_string();
        }
    }

    let deleting = has_timestamp(&pod["metadata"]["deletionTimestamp"]);
    if deleting && str_of(status, &["reason"]) == "NodeLost" {
        reason = "Unknown".to_string();
    } else if deleting && !matches!(phase, "Succeeded" | "Failed") {
        reason = "Terminating".to_string();
    }

    let restarts_text = match last_restart {
        Some(at) if restarts != 0 => format!("{restarts} ({} ago)", human_duration(now - at)),
        _ => restarts.to_string(),
    };

    let pod_ip = array(status, &["podIPs"])
        .first()
        .map(|ip| str_of(ip, &["ip"]))
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| str_of(status, &["podIP"]));
    let gates = array(spec, &["readinessGates"]);
    let readiness_gates = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let conditions = array(status, &["conditions"]);
        let true_gates = gates
            .iter()
            .filter(|gate| {
                conditions
                    .iter()
                    .find(|c| c["type"] == gate["conditionType"])
                    .is_some_and(|c| c["status"] == "True")
            })
            .count();
        format!("{true_gates}/{}", gates.len())
    };
    let cells = vec![
        json!(str_of(pod, &["metadata", "name"])),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts_text),
        json!(since(&pod["metadata"]["creationTimestamp"], now)),
        json!(or_placeholder(pod_ip, "<none>")),
        json!(or_placeholder(str_of(spec, &["nodeName"]), "<none>")),
        json!(or_placeholder(
            str_of(status, &["nominatedNodeName"]),
            "<none>"
        )),
        json!(readiness_gates),
    ];
    (cells, conditions)
}

/// The Node Status column: `Ready`/`NotReady` from the Ready condition (`Unknown` without one),
/// plus `SchedulingDisabled` when cordoned.
pub fn node_status(node: &Value) -> String {
    let mut status = match array(&node["status"], &["conditions"])
        .iter()
        .find(|c| c["type"] == "Ready")
    {
        Some(c) if c["status"] == "True" => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if node["spec"]["unschedulable"].as_bool() == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

/// The Node Roles column: `node-role.kubernetes.io/<role>` label keys and the value of a
/// `kubernetes.io/role` label, sorted, comma-separated; `<none>` without any.
pub fn node_roles(node: &Value) -> String {
    let mut roles: Vec<String> = Vec::new();
    for (key, value) in object_labels(node) {
        if let Some(role) = key.strip_prefix("node-role.kubernetes.io/") {
            if !role.is_empty() {
                roles.push(role.to_string());
            }
        } else if key == "kubernetes.io/role" && !value.is_empty() {
            roles.push(value);
        }
    }
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    }
}

fn node_cells(node: &Value, now: OffsetDateTime) -> Vec<Value> {
    let info = &node["status"]["nodeInfo"];
    let address = |kind: &str| {
        array(&node["status"], &["addresses"])
            .iter()
            .find(|a| a["type"] == kind)
            .map(|a| str_of(a, &["address"]).to_string())
            .unwrap_or_else(|| "<none>".to_string())
    };
    vec![
        json!(str_of(node, &["metadata", "name"])),
        json!(node_status(node)),
        json!(node_roles(node)),
        json!(since(&node["metadata"]["creationTimestamp"], now)),
        json!(str_of(info, &["kubeletVersion"])),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(or_placeholder(str_of(info, &["osImage"]), "<unknown>")),
        json!(or_placeholder(
            str_of(info, &["kernelVersion"]),
            "<unknown>"
        )),
        json!(or_placeholder(
            str_of(info, &["containerRuntimeVersion"]),
            "<unknown>"
        )),
    ]
}

fn event_cells(event: &Value, now: OffsetDateTime) -> Vec<Value> {
    let first_seen = if has_timestamp(&event["firstTimestamp"]) {
        since(&event["firstTimestamp"], now)
    } else {
        since(&event["eventTime"], now)
    };
    let mut last_seen = if has_timestamp(&event["lastTimestamp"]) {
        since(&event["lastTimestamp"], now)
    } else {
        first_seen.clone()
    };
    let mut count = event["count"].as_i64().unwrap_or(0);
    if event["series"].is_object() {
        last_seen = since(&event["series"]["lastObservedTime"], now);
        count = event["series"]["count"].as_i64().unwrap_or(0);
    } else if count == 0 {
        count = 1;
    }
    let involved = &event["involvedObject"];
    let kind = str_of(involved, &["kind"]).to_lowercase();
    let name = str_of(involved, &["name"]);
    let target = if name.is_empty() {
        kind
    } else {
        format!("{kind}/{name}")
    };
    let component = or_placeholder(
        str_of(event, &["source", "component"]),
        str_of(event, &["reportingComponent"]),
    );
    let host = or_placeholder(
        str_of(event, &["source", "host"]),
        str_of(event, &["reportingInstance"]),
    );
    let source = if host.is_empty() {
        component
    } else {
        format!("{component}, {host}")
    };
    vec![
        json!(last_seen),
        json!(str_of(event, &["type"])),
        json!(str_of(event, &["reason"])),
        json!(target),
        json!(str_of(involved, &["fieldPath"])),
        json!(source),
        json!(str_of(event, &["message"]).trim()),
        json!(first_seen),
        json!(count),
        json!(str_of(event, &["metadata", "name"])),
    ]
}

fn created_at(object: &Value) -> String {
    object["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(parse_timestamp)
        .map(format_timestamp)
        .unwrap_or_default()
}

/// The cells of one row, in the order of `columns_of(kind)`, with the wide columns (the
/// apiserver always fills them; kubectl hides priority-1 columns unless `-o wide`).
fn row_cells(kind: &str, object: &Value, now: OffsetDateTime) -> (Vec<Value>, Option<Value>) {
    let name = json!(str_of(object, &["metadata", "name"]));
    let age = json!(since(&object["metadata"]["creationTimestamp"], now));
    if let Some(cells) = workload_printers::cells(kind, object, now) {
        return (cells, None);
    }
    if let Some(cells) = service_printers::cells(kind, object, now) {
        return (cells, None);
    }
    let cells = match kind {
        "Pod" => return pod_cells(object, now),
        "Node" => node_cells(object, now),
        "ConfigMap" => vec![
            name,
            json!(count_keys(&object["data"]) + count_keys(&object["binaryData"])),
            age,
        ],
        "Secret" => vec![
            name,
            json!(or_placeholder(str_of(object, &["type"]), "Opaque")),
            json!(count_keys(&object["data"])),
            age,
        ],
        "Namespace" => vec![
            name,
            json!(or_placeholder(
                str_of(object, &["status", "phase"]),
                "Active"
            )),
            age,
        ],
        "Event" => event_cells(object, now),
        "Lease" => vec![
            name,
            json!(str_of(object, &["spec", "holderIdentity"])),
            age,
        ],
        _ => vec![name, json!(created_at(object))],
    };
    (cells, None)
}

pub(crate) fn row_object(object: &Value, include: IncludeObject) -> Option<Value> {
    match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(object.clone()),
        IncludeObject::Metadata => Some(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
        })),
    }
}

/// Server-side printing: the `meta.k8s.io/v1` Table for `objects` of `kind`, as the apiserver
/// answers `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` (rows carry
/// `PartialObjectMetadata`, the default `includeObject=Metadata`).
///
/// Known kinds get the columns `kubectl get` shows against a cluster; anything else gets the
/// apiserver's default Name and Created At. `list_rv` becomes `metadata.resourceVersion` (kubectl
/// `get -w` starts its watch there); ages are computed against `now`.
pub fn table(kind: &str, objects: &[Value], list_rv: &str, now: OffsetDateTime) -> Value {
    table_with(kind, objects, list_rv, now, TableOptions::default())
}

/// [`table`] with the `includeObject` and `noHeaders` choices of the request.
pub fn table_with(
    kind: &str,
    objects: &[Value],
    list_rv: &str,
    now: OffsetDateTime,
    options: TableOptions,
) -> Value {
    let columns = columns_of(kind);
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let (cells, conditions) = row_cells(kind, object, now);
            debug_assert_eq!(
                cells.len(),
                columns.len(),
                "cells of {kind} match its columns"
            );
            let mut row = Map::new();
            row.insert("cells".to_string(), Value::Array(cells));
            if let Some(conditions) = conditions {
                row.insert("conditions".to_string(), conditions);
            }
            if let Some(object) = row_object(object, options.include_object) {
                row.insert("object".to_string(), object);
            }
            Value::Object(row)
        })
        .collect();
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": list_rv},
        "rows": rows,
    });
    if !options.no_headers {
        table["columnDefinitions"] = columns
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": c.kind,
                    "format": c.format,
                    "description": c.description,
                    "priority": c.priority,
                })
            })
            .collect();
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn at(text: &str) -> OffsetDateTime {
        parse_timestamp(text).unwrap()
    }

    const NOW: &str = "2024-05-01T12:00:00Z";

    #[test]
    fn builtin_table_is_consistent() {
        for r in builtin() {
            assert_eq!(lookup(r.group, r.version, r.plural), Some(r));
            assert_eq!(lookup_kind(r.group, r.version, r.kind), Some(r));
            assert!(r.verbs.contains(&"watch"), "{} is watchable", r.plural);
        }
        assert!(lookup("", "v1", "pods").unwrap().namespaced);
        assert!(!lookup("", "v1", "nodes").unwrap().namespaced);
        assert!(lookup("", "v1", "nodes").unwrap().has_subresource("status"));
        assert_eq!(
            lookup("coordination.k8s.io", "v1", "leases")
                .unwrap()
                .api_version(),
            "coordination.k8s.io/v1"
        );
        assert!(lookup("", "v1", "leases").is_none());
        assert!(lookup("apps", "v1", "deployments").is_some_and(|d| d.has_subresource("scale")));
        assert!(lookup("apps", "v1beta1", "deployments").is_none());
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("n", "7")]);
        let none = labels(&[]);
        // (selector, matches web, matches an object without labels)
        let cases: &[(&str, bool, bool)] = &[
            ("", true, true),
            ("app=web", true, false),
            ("app==web", true, false),
            ("app = web", true, false),
            ("app!=web", false, true),
            ("app!=db", true, true),
            ("app", true, false),
            ("!app", false, true),
            ("!missing", true, true),
            ("app in (web, db)", true, false),
            ("app in (db)", false, false),
            ("app notin (db)", true, true),
            ("app notin (web,db)", false, true),
            ("app=web,tier=front", true, false),
            ("app=web,tier=back", false, false),
            ("app=web, !legacy, tier in (front)", true, false),
            ("n>5", true, false),
            ("n<5", false, false),
            ("example.com/owner", false, false),
            ("app=", false, false),
        ];
        for (selector, on_web, on_none) in cases {
            let parsed =
                LabelSelector::parse(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
            assert_eq!(parsed.matches(&web), *on_web, "{selector:?} on web");
            assert_eq!(parsed.matches(&none), *on_none, "{selector:?} on no labels");
        }
        assert_eq!(
            LabelSelector::parse("app in (a,b)").unwrap().requirements()[0].values,
            ["a", "b"]
        );
        assert!(LabelSelector::parse("").unwrap().is_empty());
    }

    #[test]
    fn label_selector_errors_name_the_bad_part() {
        let cases: &[(&str, &str)] = &[
            ("app in web", "expected '('"),
            ("app in (web", "missing ')'"),
            ("app in ()", "at least one value"),
            ("=web", "expected a label key"),
            ("app=web tier=front", "expected ','"),
            ("-bad=x", "invalid label key \"-bad\""),
            ("app=has space", "expected ','"),
            ("app=bad!value", "bad"),
            ("n>x", "integer"),
            ("a/b/c=x", "invalid label key"),
            ("app=-web", "invalid label value \"-web\""),
        ];
        for (selector, expected) in cases {
            let err = LabelSelector::parse(selector)
                .expect_err(selector)
                .to_string();
            assert!(
                err.contains(expected),
                "{selector:?}: {err:?} should contain {expected:?}"
            );
        }
    }

    fn pod(node: &str, phase: &str) -> Value {
        json!({
            "metadata": {"name": "p", "namespace": "default", "creationTimestamp": "2024-05-01T11:00:00Z"},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": phase, "podIP": "10.0.0.5"},
        })
    }

    #[test]
    fn field_selectors_parse_and_match() {
        let running = pod("edge-1", "Running");
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("spec.nodeName=edge-1", true),
            ("spec.nodeName==edge-1", true),
            ("spec.nodeName!=edge-1", false),
            ("spec.nodeName=edge-2", false),
            ("spec.nodeName=edge-1,status.phase=Running", true),
            ("spec.nodeName=edge-1,status.phase!=Running", false),
            ("metadata.name=p,metadata.namespace=default", true),
            ("spec.restartPolicy=Always", true),
            ("spec.schedulerName=default-scheduler", true),
            ("status.podIP=10.0.0.5", true),
            ("spec.hostNetwork=false", true),
        ];
        for (selector, expected) in cases {
            let parsed =
                FieldSelector::parse(selector).unwrap_or_else(|e| panic!("{selector}: {e}"));
            assert_eq!(
                parsed.matches("Pod", &running),
                Ok(*expected),
                "{selector:?}"
            );
        }
        let escaped = FieldSelector::parse(r"metadata.name=a\,b\=c\\d").unwrap();
        assert_eq!(escaped.requirements()[0].value, r"a,b=c\d");
        assert_eq!(escaped.requirements().len(), 1);
    }

    #[test]
    fn field_selector_errors() {
        let err = FieldSelector::parse("spec.nodeName").unwrap_err();
        assert!(
            matches!(err, SelectorError::FieldSyntax { ref part, .. } if part == "spec.nodeName"),
            "{err}"
        );
        let err = FieldSelector::parse("=x").unwrap_err();
        assert!(matches!(err, SelectorError::FieldSyntax { .. }), "{err}");
        let err = FieldSelector::parse(r"metadata.name=a\b").unwrap_err();
        assert!(matches!(err, SelectorError::FieldEscape { .. }), "{err}");

        let unsupported = FieldSelector::parse("spec.foo=bar").unwrap();
        let err = unsupported
            .matches("Pod", &pod("n", "Running"))
            .unwrap_err();
        assert_eq!(err.to_string(), "field label not supported: spec.foo");
        assert_eq!(unsupported.validate("Pod"), Err(err));
        assert!(
            FieldSelector::parse("spec.nodeName=x")
                .unwrap()
                .validate("ConfigMap")
                .is_err()
        );
        assert!(
            FieldSelector::parse("spec.nodeName=x")
                .unwrap()
                .validate("Pod")
                .is_ok()
        );
    }

    #[test]
    fn field_values_per_kind() {
        let event = json!({
            "metadata": {"name": "e", "namespace": "ns"},
            "involvedObject": {"kind": "Pod", "namespace": "ns", "name": "p", "uid": "u-1"},
            "reason": "Started", "type": "Normal", "source": {"component": "kubelet"},
        });
        let secret = json!({"metadata": {"name": "s"}, "type": "kubernetes.io/tls"});
        let untyped_secret = json!({"metadata": {"name": "s"}});
        let node = json!({"metadata": {"name": "edge-1"}, "spec": {"unschedulable": true}});
        let namespace =
            json!({"metadata": {"name": "default"}, "status": {"phase": "Terminating"}});
        let lease = json!({"metadata": {"name": "edge-1", "namespace": "kube-node-lease"}});
        let running = pod("edge-1", "Running");
        let cases: &[(&str, &str, &Value, Option<&str>)] = &[
            ("Pod", "metadata.name", &running, Some("p")),
            ("Pod", "metadata.namespace", &running, Some("default")),
            ("Pod", "spec.nodeName", &running, Some("edge-1")),
            ("Pod", "status.phase", &running, Some("Running")),
            ("Pod", "status.podIP", &running, Some("10.0.0.5")),
            ("Pod", "spec.serviceAccountName", &running, Some("")),
            ("Pod", "spec.unschedulable", &running, None),
            ("Event", "involvedObject.kind", &event, Some("Pod")),
            ("Event", "involvedObject.namespace", &event, Some("ns")),
            ("Event", "involvedObject.name", &event, Some("p")),
            ("Event", "involvedObject.uid", &event, Some("u-1")),
            ("Event", "reason", &event, Some("Started")),
            ("Event", "type", &event, Some("Normal")),
            ("Event", "source", &event, Some("kubelet")),
            ("Event", "spec.nodeName", &event, None),
            ("Secret", "type", &secret, Some("kubernetes.io/tls")),
            ("Secret", "type", &untyped_secret, Some("Opaque")),
            ("Node", "spec.unschedulable", &node, Some("true")),
            ("Node", "metadata.name", &node, Some("edge-1")),
            ("Node", "metadata.namespace", &node, Some("")),
            ("Node", "status.phase", &node, None),
            ("Namespace", "status.phase", &namespace, Some("Terminating")),
            (
                "Lease",
                "metadata.namespace",
                &lease,
                Some("kube-node-lease"),
            ),
            ("Lease", "spec.holderIdentity", &lease, None),
            (
                "CustomResourceDefinition",
                "metadata.name",
                &lease,
                Some("edge-1"),
            ),
        ];
        for (kind, field, object, expected) in cases {
            assert_eq!(
                field_value(kind, field, object).as_deref(),
                *expected,
                "{kind} {field}"
            );
        }
    }

    #[test]
    fn ages_read_like_kubectl() {
        let cases: &[(i64, &str)] = &[
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (5, "5s"),
            (119, "119s"),
            (120, "2m"),
            (192, "3m12s"),
            (600, "10m"),
            (179 * 60 + 59, "179m"),
            (3 * 3600, "3h"),
            (4 * 3600 + 10 * 60, "4h10m"),
            (20 * 3600, "20h"),
            (47 * 3600, "47h"),
            (51 * 3600, "2d3h"),
            (3 * 86400, "3d"),
            (30 * 86400, "30d"),
            (800 * 86400, "2y70d"),
            (365 * 3 * 86400, "3y"),
            (365 * 9 * 86400, "9y"),
        ];
        for (seconds, expected) in cases {
            assert_eq!(
                human_duration(time::Duration::seconds(*seconds)),
                *expected,
                "{seconds}s"
            );
        }
    }

    #[test]
    fn timestamps_parse() {
        let utc = at("2024-05-01T10:00:00Z");
        assert_eq!(at("2024-05-01T12:00:00+02:00"), utc);
        assert_eq!(at("2024-05-01T10:00:00.123456Z").millisecond(), 123);
        assert_eq!(
            format_timestamp(at("2024-05-01T12:00:00+02:00")),
            "2024-05-01T10:00:00Z"
        );
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T10:00:00Z",
            "2024-05-01T10:00:00",
            "yesterday",
        ] {
            assert!(parse_timestamp(bad).is_none(), "{bad:?}");
        }
    }

    fn cells(table: &Value) -> Vec<Vec<Value>> {
        table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["cells"].as_array().unwrap().clone())
            .collect()
    }

    fn pod_row(pod: Value) -> Vec<Value> {
        cells(&table("Pod", &[pod], "1", at(NOW))).remove(0)
    }

    #[test]
    fn pod_rows() {
        let running = json!({
            "metadata": {"name": "web", "creationTimestamp": "2024-05-01T11:56:48Z"},
            "spec": {"nodeName": "edge-1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {
                "phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                    {"name": "b", "ready": true, "restartCount": 0, "state": {"running": {}}},
                ],
            },
        });
        assert_eq!(
            pod_row(running),
            vec![
                json!("web"),
                json!("2/2"),
                json!("Running"),
                json!("0"),
                json!("3m12s"),
                json!("10.0.0.5"),
                json!("edge-1"),
                json!("<none>"),
                json!("<none>")
            ]
        );

        let pending = json!({
            "metadata": {"name": "new", "creationTimestamp": "2024-05-01T11:59:55Z"},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Pending"},
        });
        assert_eq!(
            pod_row(pending),
            vec![
                json!("new"),
                json!("0/1"),
                json!("Pending"),
                json!("0"),
                json!("5s"),
                json!("<none>"),
                json!("<none>"),
                json!("<none>"),
                json!("<none>")
            ]
        );

        let crash_looping = json!({
            "metadata": {"name": "crash", "creationTimestamp": "2024-05-01T08:00:00Z"},
            "spec": {"nodeName": "edge-1", "containers": [{"name": "a"}]},
            "status": {
                "phase": "Running",
                "containerStatuses": [{
                    "name": "a", "ready": false, "restartCount": 5,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2024-05-01T11:58:00Z"}},
                }],
            },
        });
        let row = pod_row(crash_looping);
        assert_eq!(
            row[1..5],
            [
                json!("0/1"),
                json!("CrashLoopBackOff"),
                json!("5 (2m ago)"),
                json!("4h")
            ]
        );

        let terminating = json!({
            "metadata": {"name": "old", "creationTimestamp": "2024-04-29T09:00:00Z",
                          "deletionTimestamp": "2024-05-01T12:00:30Z"},
            "spec": {"nodeName": "edge-1", "containers": [{"name": "a"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}}]},
        });
        assert_eq!(
            pod_row(terminating)[1..5],
            [
                json!("1/1"),
                json!("Terminating"),
                json!("0"),
                json!("2d3h")
            ]
        );

        let completed = json!({
            "metadata": {"name": "job"},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Succeeded", "containerStatuses": [
                {"name": "a", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]},
        });
        let t = table("Pod", &[completed], "1", at(NOW));
        assert_eq!(t["rows"][0]["cells"][2], "Completed");
        assert_eq!(t["rows"][0]["cells"][4], "<unknown>");
        assert_eq!(t["rows"][0]["conditions"][0]["reason"], "Succeeded");

        let initializing = json!({
            "metadata": {"name": "init"},
            "spec": {"initContainers": [{"name": "i"}], "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"name": "i", "ready": false, "restartCount": 0, "state": {"running": {}}}]},
        });
        assert_eq!(pod_row(initializing)[2], "Init:0/1");

        let init_failing = json!({
            "metadata": {"name": "init"},
            "spec": {"initContainers": [{"name": "i"}], "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"name": "i", "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
        });
        assert_eq!(
            pod_row(init_failing)[2..4],
            [json!("Init:CrashLoopBackOff"), json!("2")]
        );

        let unreachable = json!({
            "metadata": {"name": "lost", "deletionTimestamp": "2024-05-01T11:00:00Z"},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Running", "reason": "NodeLost"},
        });
        assert_eq!(pod_row(unreachable)[2], "Unknown");
    }

    fn node(name: &str, ready: Option<&str>, unschedulable: bool, labels: Value) -> Value {
        let conditions = match ready {
            Some(status) => {
                json!([{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": status}])
            }
            None => json!([]),
        };
        json!({
            "metadata": {"name": name, "labels": labels, "creationTimestamp": "2024-04-30T12:00:00Z"},
            "spec": {"unschedulable": unschedulable},
            "status": {
                "conditions": conditions,
                "addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": "192.168.1.7"}],
                "nodeInfo": {"kubeletVersion": "v1.31.0-edge", "osImage": "Debian GNU/Linux 12",
                             "kernelVersion": "6.1.0", "containerRuntimeVersion": "containerd://1.7.0"},
            },
        })
    }

    #[test]
    fn node_rows() {
        let edge = json!({"node-role.kubernetes.io/edge": "", "kubernetes.io/hostname": "edge-1"});
        let ready = node("edge-1", Some("True"), false, edge.clone());
        assert_eq!(
            pod_free_cells(&ready),
            vec![
                json!("edge-1"),
                json!("Ready"),
                json!("edge"),
                json!("24h"),
                json!("v1.31.0-edge"),
                json!("192.168.1.7"),
                json!("<none>"),
                json!("Debian GNU/Linux 12"),
                json!("6.1.0"),
                json!("containerd://1.7.0")
            ]
        );
        assert_eq!(
            node_status(&node("n", Some("False"), false, json!({}))),
            "NotReady"
        );
        assert_eq!(
            node_status(&node("n", Some("Unknown"), false, json!({}))),
            "NotReady"
        );
        assert_eq!(node_status(&node("n", None, false, json!({}))), "Unknown");
        assert_eq!(
            node_status(&node("n", Some("True"), true, json!({}))),
            "Ready,SchedulingDisabled"
        );
        assert_eq!(node_roles(&node("n", None, false, json!({}))), "<none>");
        let many = json!({"node-role.kubernetes.io/worker": "", "node-role.kubernetes.io/edge": "",
                          "node-role.kubernetes.io/": "", "kubernetes.io/role": "gpu"});
        assert_eq!(node_roles(&node("n", None, false, many)), "edge,gpu,worker");
    }

    fn pod_free_cells(object: &Value) -> Vec<Value> {
        cells(&table("Node", std::slice::from_ref(object), "1", at(NOW))).remove(0)
    }

    #[test]
    fn other_kinds_rows() {
        let now = at(NOW);
        let created = "2024-05-01T11:00:00Z";
        let cm = json!({"metadata": {"name": "cfg", "creationTimestamp": created},
                        "data": {"a": "1", "b": "2"}, "binaryData": {"c": "AA=="}});
        assert_eq!(
            cells(&table("ConfigMap", &[cm], "1", now))[0],
            [json!("cfg"), json!(3), json!("60m")]
        );
        let secret =
            json!({"metadata": {"name": "s", "creationTimestamp": created}, "data": {"k": "dg=="}});
        assert_eq!(
            cells(&table("Secret", &[secret], "1", now))[0],
            [json!("s"), json!("Opaque"), json!(1), json!("60m")]
        );
        let ns = json!({"metadata": {"name": "default", "creationTimestamp": created}, "status": {"phase": "Active"}});
        assert_eq!(
            cells(&table("Namespace", &[ns], "1", now))[0],
            [json!("default"), json!("Active"), json!("60m")]
        );
        let lease = json!({"metadata": {"name": "edge-1", "creationTimestamp": created}, "spec": {"holderIdentity": "edge-1"}});
        assert_eq!(
            cells(&table("Lease", &[lease], "1", now))[0],
            [json!("edge-1"), json!("edge-1"), json!("60m")]
        );
        let crd = json!({"metadata": {"name": "devices.example.com", "creationTimestamp": "2024-05-01T13:00:00+02:00"}});
        assert_eq!(
            cells(&table("CustomResourceDefinition", &[crd], "1", now))[0],
            [json!("devices.example.com"), json!("2024-05-01T11:00:00Z")]
        );
        let event = json!({
            "metadata": {"name": "web.17", "creationTimestamp": created},
            "involvedObject": {"kind": "Pod", "name": "web", "fieldPath": "spec.containers{a}"},
            "reason": "Pulled", "type": "Normal", "message": " pulled image \n",
            "source": {"component": "kubelet", "host": "edge-1"},
            "firstTimestamp": "2024-05-01T11:00:00Z", "lastTimestamp": "2024-05-01T11:59:00Z", "count": 3,
        });
        assert_eq!(
            cells(&table("Event", &[event], "1", now))[0],
            [
                json!("60s"),
                json!("Normal"),
                json!("Pulled"),
                json!("pod/web"),
                json!("spec.containers{a}"),
                json!("kubelet, edge-1"),
                json!("pulled image"),
                json!("60m"),
                json!(3),
                json!("web.17")
            ]
        );
    }

    #[test]
    fn table_shape() {
        let cm = json!({"metadata": {"name": "cfg", "namespace": "default", "labels": {"a": "b"}}, "data": {}});
        let t = table("ConfigMap", std::slice::from_ref(&cm), "42", at(NOW));
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(t["metadata"]["resourceVersion"], "42");
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Data", "Age"]);
        assert_eq!(t["columnDefinitions"][0]["format"], "name");
        let object = &t["rows"][0]["object"];
        assert_eq!(object["kind"], "PartialObjectMetadata");
        assert_eq!(object["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(object["metadata"]["labels"]["a"], "b");
        assert!(object.get("data").is_none());

        let full = table_with(
            "ConfigMap",
            std::slice::from_ref(&cm),
            "42",
            at(NOW),
            TableOptions {
                include_object: IncludeObject::Object,
                no_headers: true,
            },
        );
        assert_eq!(full["rows"][0]["object"], cm);
        assert!(full.get("columnDefinitions").is_none());
        let bare = table_with(
            "ConfigMap",
            &[cm],
            "42",
            at(NOW),
            TableOptions {
                include_object: IncludeObject::None,
                no_headers: false,
            },
        );
        assert!(bare["rows"][0].get("object").is_none());
        assert_eq!(IncludeObject::parse("Object"), Some(IncludeObject::Object));
        assert_eq!(IncludeObject::parse("object"), None);

        let pods = table("Pod", &[], "7", at(NOW));
        let priorities: Vec<(String, u64)> = pods["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["priority"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            priorities,
            [
                ("Name", 0),
                ("Ready", 0),
                ("Status", 0),
                ("Restarts", 0),
                ("Age", 0),
                ("IP", 1),
                ("Node", 1),
                ("Nominated Node", 1),
                ("Readiness Gates", 1)
            ]
            .map(|(n, p)| (n.to_string(), p))
        );
        assert_eq!(pods["rows"], json!([]));
        let events = table("Event", &[], "7", at(NOW));
        let shown: Vec<&str> = events["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["priority"] == 0)
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(shown, ["Last Seen", "Type", "Reason", "Object", "Message"]);
    }
}
