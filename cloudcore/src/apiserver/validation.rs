//! `fieldValidation`: what happens to fields the kind's schema does not declare and to keys a
//! JSON object repeats, as kube-apiserver's strict decoding does (`Strict`, `Warn`, `Ignore`;
//! `Warn` when the request names none).
//!
//! The schema of a built-in kind is not written here: it is the typed struct of k8s-openapi,
//! which is decoded from the request with `serde_ignored`, so every key the struct's decoder
//! skips (at any depth, with its path) is an unknown field. A custom resource's schema is its
//! CRD's ([`crd::unknown_fields`]). Repeated keys are found by walking the body's JSON tokens.
//! Findings are listed in the order of the document, as the apiserver's decoder meets them.
//!
//! - `Strict`: any finding refuses the request (400 for a create or update body; 422 for a
//!   patch, whose result is what is decoded), listing them all.
//! - `Warn`: one `Warning: 299 - "unknown field \"spec.foo\""` header per finding; unknown
//!   fields are dropped and the last of repeated keys wins.
//! - `Ignore`: the same, silently.

use std::collections::{HashMap, HashSet};
use std::fmt;

use axum::http::{HeaderValue, Method};
use axum::response::Response;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::crd;
use super::dryrun::invalid_options;
use super::resources::ResourceInfo;
use super::status::{ApiError, Cause};

/// How a write treats unknown and repeated fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Dropped silently.
    Ignore,
    /// Dropped, each reported in a `Warning` header.
    #[default]
    Warn,
    /// The request is refused.
    Strict,
}

impl FieldValidation {
    /// `?fieldValidation=` of a create, update or patch; absent or empty is `Warn`. Another
    /// value is kube-apiserver's 422 naming the options kind.
    pub fn from_query(
        method: &Method,
        query: &HashMap<String, String>,
    ) -> Result<FieldValidation, ApiError> {
        match query.get("fieldValidation").map(String::as_str) {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(invalid_options(
                method,
                vec![Cause {
                    field: "fieldValidation".into(),
                    message: format!(
                        "Unsupported value: {other:?}: supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
                    ),
                }],
            )),
        }
    }
}

/// One step of a field path: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// Where a field is: `spec.containers[0].bar`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct FieldPath(pub Vec<Segment>);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

impl FieldPath {
    /// Reads `spec.items[0].bar` back (keys containing dots cannot be told apart).
    pub fn parse(text: &str) -> FieldPath {
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_string()));
            }
            while let Some((index, after)) = rest.split_once(']') {
                if let Ok(i) = index.parse() {
                    segments.push(Segment::Index(i));
                }
                rest = after.strip_prefix('[').unwrap_or(after);
            }
        }
        FieldPath(segments)
    }

    fn from_ignored(path: &serde_ignored::Path<'_>) -> FieldPath {
        fn walk(path: &serde_ignored::Path<'_>, out: &mut Vec<Segment>) {
            match path {
                serde_ignored::Path::Root => {}
                serde_ignored::Path::Seq { parent, index } => {
                    walk(parent, out);
                    out.push(Segment::Index(*index));
                }
                serde_ignored::Path::Map { parent, key } => {
                    walk(parent, out);
                    out.push(Segment::Key(key.clone()));
                }
                serde_ignored::Path::Some { parent }
                | serde_ignored::Path::NewtypeStruct { parent }
                | serde_ignored::Path::NewtypeVariant { parent } => walk(parent, out),
            }
        }
        let mut segments = Vec::new();
        walk(path, &mut segments);
        FieldPath(segments)
    }

    fn starts_with(&self, prefix: &FieldPath) -> bool {
        self.0.len() > prefix.0.len() && self.0[..prefix.0.len()] == prefix.0[..]
    }
}

/// What strict decoding reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A field the schema does not declare.
    Unknown(FieldPath),
    /// A key repeated in one JSON object.
    Duplicate(FieldPath),
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Unknown(path) => write!(f, "unknown field \"{path}\""),
            Finding::Duplicate(path) => write!(f, "duplicate field \"{path}\""),
        }
    }
}

/// Decodes `input` as `T`, collecting the paths of the keys its decoder skipped. A decoding
/// error (a wrong type, a missing required field) ends the walk: what was seen until then is
/// returned, and the error is left to validation.
fn skipped<'de, T: de::Deserialize<'de>, D: Deserializer<'de>>(input: D) -> Vec<FieldPath> {
    let mut found = Vec::new();
    let _ = serde_ignored::deserialize::<_, _, T>(input, |path| {
        found.push(FieldPath::from_ignored(&path))
    });
    found
}

/// The typed schema of a built-in kind, or of a subresource's body.
fn typed_unknown<'de, D: Deserializer<'de>>(
    info: &ResourceInfo,
    subresource: Option<&str>,
    input: D,
) -> Option<Vec<FieldPath>> {
    use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
    use k8s_openapi::api::{autoscaling::v1 as autoscaling, coordination::v1 as coordination};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
    match subresource {
        Some("scale") => return Some(skipped::<autoscaling::Scale, _>(input)),
        Some("binding") => return Some(skipped::<core::Binding, _>(input)),
        _ => {}
    }
    Some(match (info.group, info.kind) {
        ("", "Pod") => skipped::<core::Pod, _>(input),
        ("", "Node") => skipped::<core::Node, _>(input),
        ("", "Namespace") => skipped::<core::Namespace, _>(input),
        ("", "ConfigMap") => skipped::<core::ConfigMap, _>(input),
        ("", "Secret") => skipped::<core::Secret, _>(input),
        ("", "Event") => skipped::<core::Event, _>(input),
        ("", "ServiceAccount") => skipped::<core::ServiceAccount, _>(input),
        ("", "Service") => skipped::<core::Service, _>(input),
        ("", "Endpoints") => skipped::<core::Endpoints, _>(input),
        ("apps", "Deployment") => skipped::<apps::Deployment, _>(input),
        ("apps", "ReplicaSet") => skipped::<apps::ReplicaSet, _>(input),
        ("apps", "DaemonSet") => skipped::<apps::DaemonSet, _>(input),
        ("apps", "StatefulSet") => skipped::<apps::StatefulSet, _>(input),
        ("apps", "ControllerRevision") => skipped::<apps::ControllerRevision, _>(input),
        ("batch", "Job") => skipped::<batch::Job, _>(input),
        ("batch", "CronJob") => skipped::<batch::CronJob, _>(input),
        ("coordination.k8s.io", "Lease") => skipped::<coordination::Lease, _>(input),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            skipped::<apiextensions::CustomResourceDefinition, _>(input)
        }
        ("events.k8s.io", "Event") => skipped::<k8s_openapi::api::events::v1::Event, _>(input),
        ("discovery.k8s.io", "EndpointSlice") => {
            skipped::<k8s_openapi::api::discovery::v1::EndpointSlice, _>(input)
        }
        _ => return None,
    })
}

/// Which schema a subresource's document has: `scale` and `binding` bodies are `Scale` and
/// `Binding` objects, but a handler may also hand over the parent object itself (a patched
/// Deployment behind `/scale`), which is checked against its own kind. A body without a
/// `kind` is taken as the subresource's.
fn schema_of<'a>(subresource: Option<&'a str>, kind: Option<&str>) -> Option<&'a str> {
    match (subresource, kind) {
        (Some("scale"), Some(kind)) if kind != "Scale" => None,
        (Some("binding"), Some(kind)) if kind != "Binding" => None,
        (other, _) => other,
    }
}

/// The unknown fields of `object`: from the typed schema of a built-in kind, else from the
/// CRD of a custom resource.
pub fn unknown_fields(
    info: &ResourceInfo,
    subresource: Option<&str>,
    object: &Value,
) -> Vec<FieldPath> {
    let subresource = schema_of(subresource, object["kind"].as_str());
    typed_unknown(info, subresource, object).unwrap_or_else(|| {
        crd::unknown_fields(info, object)
            .iter()
            .map(|p| FieldPath::parse(p))
            .collect()
    })
}

/// One key met while walking a JSON document, in document order.
struct KeySeen {
    path: FieldPath,
    repeated: bool,
}

/// Walks a JSON document recording every object key with its path, and whether it repeats a
/// key of the same object.
struct Walk<'a> {
    path: FieldPath,
    seen: &'a mut Vec<KeySeen>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        loop {
            let mut path = self.path.clone();
            path.0.push(Segment::Index(index));
            let walk = Walk {
                path,
                seen: &mut *self.seen,
            };
            if seq.next_element_seed(walk)?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let mut path = self.path.clone();
            path.0.push(Segment::Key(key.clone()));
            let repeated = !keys.insert(key);
            self.seen.push(KeySeen {
                path: path.clone(),
                repeated,
            });
            map.next_value_seed(Walk {
                path,
                seen: &mut *self.seen,
            })?;
        }
        Ok(())
    }
}

/// Orders unknown fields and repeated keys as a decoder meets them in `document`: a repeated
/// key inside an unknown field is not reported (its whole value was skipped).
fn in_document_order(document: &[u8], unknown: Vec<FieldPath>) -> Vec<Finding> {
    let mut seen = Vec::new();
    let mut walker = serde_json::Deserializer::from_slice(document);
    let walked = Walk {
        path: FieldPath::default(),
        seen: &mut seen,
    }
    .deserialize(&mut walker);
    let unknown_set: HashSet<&FieldPath> = unknown.iter().collect();
    let mut reported = HashSet::new();
    let mut findings = Vec::new();
    for key in &seen {
        if unknown.iter().any(|u| key.path.starts_with(u)) {
            continue;
        }
        if unknown_set.contains(&key.path) {
            if reported.insert(key.path.clone()) {
                findings.push(Finding::Unknown(key.path.clone()));
            }
        } else if key.repeated {
            findings.push(Finding::Duplicate(key.path.clone()));
        }
    }
    // Anything the walk did not meet (it stops at a syntax error the body parser reports).
    if walked.is_err() {
        for path in unknown {
            if !reported.contains(&path) {
                findings.push(Finding::Unknown(path));
            }
        }
    }
    findings
}

/// The findings in a create or update body, in document order.
pub fn body_findings(info: &ResourceInfo, subresource: Option<&str>, body: &[u8]) -> Vec<Finding> {
    let subresource = match subresource {
        Some("scale" | "binding") => {
            let kind = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["kind"].as_str().map(String::from));
            schema_of(subresource, kind.as_deref())
        }
        other => other,
    };
    let unknown = match typed_unknown(
        info,
        subresource,
        &mut serde_json::Deserializer::from_slice(body),
    ) {
        Some(unknown) => unknown,
        None => match serde_json::from_slice::<Value>(body) {
            Ok(object) => unknown_fields(info, subresource, &object),
            Err(_) => Vec::new(),
        },
    };
    in_document_order(body, unknown)
}

/// The findings in an object the server computed (a patch's result): unknown fields only.
pub fn object_findings(
    info: &ResourceInfo,
    subresource: Option<&str>,
    object: &Value,
) -> Vec<Finding> {
    unknown_fields(info, subresource, object)
        .into_iter()
        .map(Finding::Unknown)
        .collect()
}

/// Removes the field at `path` (if present).
fn remove(object: &mut Value, path: &FieldPath) {
    let Some((last, parents)) = path.0.split_last() else {
        return;
    };
    let mut node = object;
    for segment in parents {
        let next = match segment {
            Segment::Key(key) => node.get_mut(key.as_str()),
            Segment::Index(index) => node.get_mut(*index),
        };
        match next {
            Some(next) => node = next,
            None => return,
        }
    }
    if let (Segment::Key(key), Some(map)) = (last, node.as_object_mut()) {
        map.remove(key);
    }
}

/// The strict decoding error text: `strict decoding error: unknown field "spec.foo", …`.
pub fn strict_message(findings: &[Finding]) -> String {
    let listed: Vec<String> = findings.iter().map(ToString::to_string).collect();
    format!("strict decoding error: {}", listed.join(", "))
}

/// A create or update body refused under `Strict`: kube-apiserver's 400.
pub fn body_error(info: &ResourceInfo, findings: &[Finding]) -> ApiError {
    ApiError::bad_request(format!(
        "{kind} in version \"{version}\" cannot be handled as a {kind}: {}",
        strict_message(findings),
        kind = info.kind,
        version = info.version,
    ))
}

/// A patch whose result is refused under `Strict`: kube-apiserver's 422 on the field `patch`,
/// quoting the patched object.
pub fn patch_error(patched: &Value, findings: &[Finding]) -> ApiError {
    ApiError::invalid(
        "",
        "",
        vec![Cause {
            field: "patch".into(),
            message: format!(
                "Invalid value: {:?}: {}",
                patched.to_string(),
                strict_message(findings)
            ),
        }],
    )
}

/// Applies `mode` to `findings` about `object`: `Strict` with findings is `refuse`'s error;
/// otherwise unknown fields are removed from `object` and, under `Warn`, the findings come
/// back as warning texts for [`with_warnings`].
pub fn enforce(
    mode: FieldValidation,
    findings: &[Finding],
    object: &mut Value,
    refuse: impl FnOnce(&[Finding]) -> ApiError,
) -> Result<Vec<String>, ApiError> {
    if findings.is_empty() {
        return Ok(Vec::new());
    }
    if mode == FieldValidation::Strict {
        return Err(refuse(findings));
    }
    for finding in findings {
        if let Finding::Unknown(path) = finding {
            remove(object, path);
        }
    }
    Ok(match mode {
        FieldValidation::Warn => findings.iter().map(ToString::to_string).collect(),
        _ => Vec::new(),
    })
}

/// Adds one `Warning: 299 - "text"` header per warning, as kube-apiserver sends them (kubectl
/// prints each as `Warning: text`).
pub fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for text in warnings {
        let quoted = text.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = HeaderValue::from_str(&format!("299 - \"{quoted}\"")) {
            response.headers_mut().append("warning", value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::super::resources;
    use super::*;
    use serde_json::json;

    fn info(group: &str, version: &str, plural: &str) -> &'static ResourceInfo {
        resources::lookup(group, version, plural).expect("builtin resource")
    }

    fn texts(findings: &[Finding]) -> Vec<String> {
        findings.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_fields_at_any_depth_in_document_order() {
        let pods = info("", "v1", "pods");
        let body = br#"{"metadata":{"name":"p","name":"q"},"spec":{"foo":1,"containers":[{"name":"c","image":"i","bar":2,"bar":3}]},"zzz":1}"#;
        let findings = body_findings(pods, None, body);
        // kube-apiserver 1.36 answers exactly these, in this order.
        assert_eq!(
            strict_message(&findings),
            r#"strict decoding error: duplicate field "metadata.name", unknown field "spec.foo", unknown field "spec.containers[0].bar", unknown field "zzz""#
        );
        let e = body_error(pods, &findings);
        assert_eq!((e.code.as_u16(), e.reason), (400, "BadRequest"));
        assert!(
            e.message
                .starts_with("Pod in version \"v1\" cannot be handled as a Pod: strict decoding error: duplicate field"),
            "{}",
            e.message
        );
    }

    #[test]
    fn metadata_status_and_workload_fields_are_known() {
        let deployments = info("apps", "v1", "deployments");
        let body = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "default", "labels": {"any.key/x": "y"},
                "annotations": {"a": "b"}, "finalizers": ["f"], "generation": 3,
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "u",
                    "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "m", "operation": "Apply", "apiVersion": "apps/v1",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:anything": {}}}}]},
            "spec": {"replicas": 2, "minReadySeconds": 1, "revisionHistoryLimit": 3,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
                "selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "a"}}, "spec": {
                    "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}],
                        "resources": {"limits": {"cpu": "1"}}, "readinessProbe": {"httpGet": {"port": "http", "path": "/"}}}],
                    "tolerations": [{"key": "k", "operator": "Exists"}]}}},
            "status": {"replicas": 2, "readyReplicas": 1, "observedGeneration": 3,
                "conditions": [{"type": "Available", "status": "True", "reason": "r", "message": "m",
                    "lastUpdateTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        });
        let text = body.to_string();
        assert_eq!(body_findings(deployments, None, text.as_bytes()), vec![]);
        let job = json!({"metadata": {"name": "j"}, "spec": {"completions": 3, "parallelism": 2,
            "backoffLimit": 1, "ttlSecondsAfterFinished": 5, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}},
            "status": {"succeeded": 1, "uncountedTerminatedPods": {"succeeded": ["u"]}}});
        assert_eq!(
            object_findings(info("batch", "v1", "jobs"), None, &job),
            vec![]
        );
        let scale = json!({"metadata": {"name": "d"}, "spec": {"replicas": 3, "bogus": 1}});
        assert_eq!(
            texts(&object_findings(deployments, Some("scale"), &scale)),
            vec![r#"unknown field "spec.bogus""#]
        );
        // The parent object behind `/scale` is checked as itself, never as a Scale.
        assert_eq!(object_findings(deployments, Some("scale"), &body), vec![]);
        assert_eq!(
            body_findings(deployments, Some("scale"), text.as_bytes()),
            vec![]
        );
    }

    #[test]
    fn warn_and_ignore_drop_unknown_fields_and_strict_refuses() {
        let configmaps = info("", "v1", "configmaps");
        let body = br#"{"metadata":{"name":"c","zz":1},"data":{"x":"1","x":"2"},"foo":{"bar":1}}"#;
        let findings = body_findings(configmaps, None, body);
        assert_eq!(
            texts(&findings),
            vec![
                r#"unknown field "metadata.zz""#,
                r#"duplicate field "data.x""#,
                r#"unknown field "foo""#
            ]
        );
        let parsed: Value = serde_json::from_slice(body).expect("json");
        let mut object = parsed.clone();
        let warnings = enforce(FieldValidation::Warn, &findings, &mut object, |_| {
            unreachable!("warn never refuses")
        })
        .expect("warn");
        assert_eq!(warnings.len(), 3);
        assert_eq!(
            object,
            json!({"metadata": {"name": "c"}, "data": {"x": "2"}})
        );
        let mut object = parsed.clone();
        let warnings = enforce(FieldValidation::Ignore, &findings, &mut object, |_| {
            unreachable!("ignore never refuses")
        })
        .expect("ignore");
        assert!(warnings.is_empty());
        assert_eq!(
            object,
            json!({"metadata": {"name": "c"}, "data": {"x": "2"}})
        );
        let mut object = parsed;
        let e = enforce(FieldValidation::Strict, &findings, &mut object, |f| {
            body_error(configmaps, f)
        })
        .expect_err("strict");
        assert_eq!(e.code.as_u16(), 400);
    }

    #[test]
    fn patch_results_are_refused_on_the_patch_field() {
        let configmaps = info("", "v1", "configmaps");
        let patched = json!({"metadata": {"name": "c", "zz": 1}, "foo": {"bar": 1}});
        let findings = object_findings(configmaps, None, &patched);
        let e = patch_error(&patched, &findings);
        assert_eq!((e.code.as_u16(), e.reason), (422, "Invalid"));
        assert!(
            e.message
                .starts_with(" \"\" is invalid: patch: Invalid value: \"{"),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with(
                r#"strict decoding error: unknown field "foo", unknown field "metadata.zz""#
            ),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_option_takes_kube_apiservers_values() {
        let q = |v: &str| HashMap::from([("fieldValidation".to_string(), v.to_string())]);
        let put = Method::PUT;
        assert_eq!(
            FieldValidation::from_query(&put, &HashMap::new()),
            Ok(FieldValidation::Warn)
        );
        assert_eq!(
            FieldValidation::from_query(&put, &q("Strict")),
            Ok(FieldValidation::Strict)
        );
        let e = FieldValidation::from_query(&put, &q("Bogus")).expect_err("bogus");
        assert_eq!(
            e.message,
            "UpdateOptions.meta.k8s.io \"\" is invalid: fieldValidation: Unsupported value: \"Bogus\": supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
        );
    }

    #[test]
    fn paths_print_and_parse_back() {
        let path = FieldPath::parse("spec.containers[0].bar");
        assert_eq!(
            path.0,
            vec![
                Segment::Key("spec".into()),
                Segment::Key("containers".into()),
                Segment::Index(0),
                Segment::Key("bar".into())
            ]
        );
        assert_eq!(path.to_string(), "spec.containers[0].bar");
        let mut object = json!({"spec": {"containers": [{"bar": 1, "name": "c"}]}});
        remove(&mut object, &path);
        assert_eq!(object, json!({"spec": {"containers": [{"name": "c"}]}}));
    }

    #[test]
    fn malformed_documents_do_not_panic() {
        let pods = info("", "v1", "pods");
        for body in [
            &b"{"[..],
            b"[]",
            b"{\"spec\": 5}",
            b"{\"spec\":{\"containers\":\"x\"}}",
            b"",
        ] {
            let _ = body_findings(pods, None, body);
        }
    }
}
