//! Structural OpenAPI v3 schemas of custom resources: pruning of undeclared fields, defaulting,
//! and validation with kube-apiserver's field paths and messages.
//!
//! Schemas stay the JSON the CustomResourceDefinition carries (`openAPIV3Schema`); every walk
//! reads it directly. Paths are written as kube-apiserver writes them: `spec.items[0].name`,
//! map values as `spec.labels.key`.

use serde_json::{Map, Value};

use crate::apiserver::status::Cause;

/// The fields of `ObjectMeta`: what survives in `metadata` at the root and in embedded
/// resources (everything else there is pruned, as decoding into `ObjectMeta` drops it).
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Whether a JSON number is whole (what Go's decoder makes an `int64`).
fn is_whole(value: &Value) -> bool {
    match value {
        Value::Number(n) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

/// The JSON type name kube-openapi reports for a value in "must be of type" errors.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_whole(value) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A value as `field.Invalid` prints it: strings quoted, numbers and booleans bare.
pub(crate) fn go_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// Whole floats become integers (`2.0` → `2`), as Go's decoding of unstructured JSON and its
/// encoding back do, so a stored object reads the same as from kube-apiserver.
pub fn normalize_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f >= i64::MIN as f64
                && f <= i64::MAX as f64
            {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_numbers),
        Value::Object(map) => map.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Pruning
// ---------------------------------------------------------------------------------------------

/// Drops the fields of `object` that the schema does not declare and returns their paths (the
/// `unknown field` list of `fieldValidation`). `apiVersion`, `kind` and `metadata` at the root
/// and in embedded resources are always kept; `metadata` keeps only `ObjectMeta`'s fields.
pub fn prune(schema: &Value, object: &mut Value) -> Vec<String> {
    let mut dropped = Vec::new();
    prune_at(schema, object, "", true, &mut dropped);
    dropped
}

fn prune_meta(meta: &mut Value, path: &str, dropped: &mut Vec<String>) {
    if let Some(map) = meta.as_object_mut() {
        map.retain(|key, _| {
            let known = OBJECT_META_FIELDS.contains(&key.as_str());
            if !known {
                dropped.push(child(path, key));
            }
            known
        });
    }
}

fn prune_at(
    schema: &Value,
    value: &mut Value,
    path: &str,
    resource: bool,
    dropped: &mut Vec<String>,
) {
    match value {
        Value::Object(map) => {
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let at = child(path, &key);
                if resource && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    if key == "metadata"
                        && let Some(meta) = map.get_mut(&key)
                    {
                        prune_meta(meta, &at, dropped);
                    }
                    continue;
                }
                let Some(field) = map.get_mut(&key) else {
                    continue;
                };
                if let Some(sub) = properties.and_then(|p| p.get(&key)) {
                    let embedded = flag(sub, "x-kubernetes-embedded-resource");
                    prune_at(sub, field, &at, embedded, dropped);
                } else if let Some(sub) = additional.filter(|a| a.is_object()) {
                    let embedded = flag(sub, "x-kubernetes-embedded-resource");
                    prune_at(sub, field, &at, embedded, dropped);
                } else if preserve || additional == Some(&Value::Bool(true)) {
                    // Kept as sent, and not looked into.
                } else {
                    map.remove(&key);
                    dropped.push(at);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items").filter(|s| s.is_object()) {
                let embedded = flag(sub, "x-kubernetes-embedded-resource");
                for (i, item) in items.iter_mut().enumerate() {
                    prune_at(sub, item, &format!("{path}[{i}]"), embedded, dropped);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Defaulting
// ---------------------------------------------------------------------------------------------

/// Fills in `default`s of absent fields and handles nulls as kube-apiserver does: a null in a
/// field that is not `nullable` takes the field's default, or is dropped when it has none.
/// Applied on create, on update and when objects are read.
pub fn apply_defaults(schema: &Value, object: &mut Value) {
    default_at(schema, object, true);
}

fn nullable(schema: &Value) -> bool {
    flag(schema, "nullable")
}

fn default_field(map: &mut Map<String, Value>, key: &str, sub: &Value) {
    match map.get(key) {
        None => {
            if let Some(default) = sub.get("default") {
                map.insert(key.to_string(), default.clone());
            }
        }
        Some(Value::Null) if !nullable(sub) => match sub.get("default") {
            Some(default) => {
                map.insert(key.to_string(), default.clone());
            }
            None => {
                map.remove(key);
            }
        },
        Some(_) => {}
    }
    if let Some(value) = map.get_mut(key) {
        default_at(sub, value, false);
    }
}

fn default_at(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (key, sub) in properties {
                    if root && key == "metadata" {
                        continue;
                    }
                    default_field(map, key, sub);
                }
            }
            if let Some(sub) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    default_field(map, &key, sub);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items").filter(|s| s.is_object()) {
                for item in items.iter_mut() {
                    if item.is_null()
                        && !nullable(sub)
                        && let Some(default) = sub.get("default")
                    {
                        *item = default.clone();
                    }
                    default_at(sub, item, false);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Validates `object` against the schema; one [`Cause`] per failure, with kube-apiserver's
/// field path and message. `metadata` at the root is left to the generic object rules.
pub fn validate(schema: &Value, object: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    validate_at(schema, object, "", true, &mut causes);
    causes
}

/// Validates `value` against a sub-schema as kube-apiserver validates a `/status` write: the
/// messages name paths from the sub-schema's root (`replicas in body ...`), the causes' fields
/// carry `prefix` (`status.replicas`).
pub fn validate_subtree(schema: &Value, value: &Value, prefix: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    validate_at(schema, value, "", false, &mut causes);
    for cause in &mut causes {
        cause.field = if cause.field.is_empty() {
            prefix.to_string()
        } else if cause.field.starts_with('[') {
            format!("{prefix}{}", cause.field)
        } else {
            format!("{prefix}.{}", cause.field)
        };
    }
    causes
}

fn push(causes: &mut Vec<Cause>, field: &str, message: String) {
    causes.push(Cause {
        field: field.to_string(),
        message,
    });
}

fn type_error(causes: &mut Vec<Cause>, path: &str, want: &str, value: &Value) {
    let got = type_name(value);
    push(
        causes,
        path,
        format!("Invalid value: {got:?}: {path} in body must be of type {want}: {got:?}"),
    );
}

fn type_matches(want: &str, value: &Value) -> bool {
    match want {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => is_whole(value),
        "number" => value.is_number(),
        _ => true,
    }
}

fn number(schema: &Value, key: &str) -> Option<f64> {
    schema.get(key).and_then(Value::as_f64)
}

fn count(schema: &Value, key: &str) -> Option<u64> {
    schema.get(key).and_then(Value::as_u64)
}

/// Go's `%v` of a float64 bound: whole numbers without a fraction.
fn bound(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

fn validate_at(schema: &Value, value: &Value, path: &str, root: bool, causes: &mut Vec<Cause>) {
    if value.is_null() {
        if !nullable(schema)
            && let Some(want) = schema.get("type").and_then(Value::as_str)
        {
            type_error(causes, path, want, value);
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(is_whole(value) || value.is_string()) {
            type_error(causes, path, "integer,string", value);
            return;
        }
    } else if let Some(want) = schema.get("type").and_then(Value::as_str)
        && !type_matches(want, value)
    {
        type_error(causes, path, want, value);
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(go_value).collect();
        push(
            causes,
            path,
            format!(
                "Unsupported value: {}: supported values: {}",
                go_value(value),
                list.join(", ")
            ),
        );
    }
    match value {
        Value::String(text) => validate_string(schema, text, value, path, causes),
        Value::Number(_) => validate_number(schema, value, path, causes),
        Value::Array(items) => {
            if let Some(max) = count(schema, "maxItems")
                && items.len() as u64 > max
            {
                push(
                    causes,
                    path,
                    format!("Too many: {}: must have at most {max} items", items.len()),
                );
            }
            if let Some(min) = count(schema, "minItems")
                && (items.len() as u64) < min
            {
                push(
                    causes,
                    path,
                    format!(
                        "Invalid value: {}: {path} in body should have at least {min} items",
                        items.len()
                    ),
                );
            }
            if let Some(sub) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter().enumerate() {
                    validate_at(sub, item, &format!("{path}[{i}]"), false, causes);
                }
            }
        }
        Value::Object(map) => {
            if let Some(max) = count(schema, "maxProperties")
                && map.len() as u64 > max
            {
                push(
                    causes,
                    path,
                    format!("Too many: {}: must have at most {max} items", map.len()),
                );
            }
            if let Some(min) = count(schema, "minProperties")
                && (map.len() as u64) < min
            {
                push(
                    causes,
                    path,
                    format!(
                        "Invalid value: {}: {path} in body should have at least {min} properties",
                        map.len()
                    ),
                );
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, field) in map {
                if root && key == "metadata" {
                    continue;
                }
                let at = child(path, key);
                if let Some(sub) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate_at(sub, field, &at, false, causes);
                }
            }
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    if map.get(name).is_none_or(Value::is_null) {
                        push(causes, &child(path, name), "Required value".into());
                    }
                }
            }
            if flag(schema, "x-kubernetes-embedded-resource") {
                for name in ["apiVersion", "kind"] {
                    if map
                        .get(name)
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        push(causes, &child(path, name), "Required value".into());
                    }
                }
            }
        }
        _ => {}
    }
}

fn validate_string(schema: &Value, text: &str, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    // kube-openapi's string validator stops at the first of maxLength, minLength and pattern
    // that fails; the format is checked on its own.
    let length = text.chars().count() as u64;
    let too_long = count(schema, "maxLength").filter(|max| length > *max);
    let too_short = count(schema, "minLength").filter(|min| length < *min);
    // Patterns were compiled when the definition was accepted; one that does not compile here
    // was refused there, so it is skipped rather than failing every object.
    let mismatch = schema
        .get("pattern")
        .and_then(Value::as_str)
        .filter(|p| regex::Regex::new(p).is_ok_and(|re| !re.is_match(text)));
    if let Some(max) = too_long {
        push(
            causes,
            path,
            format!("Too long: may not be more than {max} bytes"),
        );
    } else if let Some(min) = too_short {
        push(
            causes,
            path,
            format!(
                "Invalid value: {}: {path} in body should be at least {min} chars long",
                go_value(value)
            ),
        );
    } else if let Some(pattern) = mismatch {
        push(
            causes,
            path,
            format!(
                "Invalid value: {}: {path} in body should match '{pattern}'",
                go_value(value)
            ),
        );
    }
    if let Some(format) = schema.get("format").and_then(Value::as_str)
        && !format_matches(format, text)
    {
        push(
            causes,
            path,
            format!(
                "Invalid value: {}: {path} in body must be of type {format}: {}",
                go_value(value),
                go_value(value)
            ),
        );
    }
}

fn validate_number(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let Some(n) = value.as_f64() else {
        return;
    };
    let shown = go_value(value);
    if let Some(max) = number(schema, "maximum") {
        let exclusive = flag(schema, "exclusiveMaximum");
        if exclusive && n >= max {
            push(
                causes,
                path,
                format!(
                    "Invalid value: {shown}: {path} in body should be less than {}",
                    bound(max)
                ),
            );
        } else if !exclusive && n > max {
            push(
                causes,
                path,
                format!(
                    "Invalid value: {shown}: {path} in body should be less than or equal to {}",
                    bound(max)
                ),
            );
        }
    }
    if let Some(min) = number(schema, "minimum") {
        let exclusive = flag(schema, "exclusiveMinimum");
        if exclusive && n <= min {
            push(
                causes,
                path,
                format!(
                    "Invalid value: {shown}: {path} in body should be greater than {}",
                    bound(min)
                ),
            );
        } else if !exclusive && n < min {
            push(
                causes,
                path,
                format!(
                    "Invalid value: {shown}: {path} in body should be greater than or equal to {}",
                    bound(min)
                ),
            );
        }
    }
    if let Some(factor) = number(schema, "multipleOf")
        && factor > 0.0
        && (n / factor).fract() != 0.0
    {
        push(
            causes,
            path,
            format!(
                "Invalid value: {shown}: {path} in body should be a multiple of {}",
                bound(factor)
            ),
        );
    }
}

/// The string formats kube-apiserver checks for custom resources that this server checks too;
/// any other format (`password`, `isbn`, ...) is accepted as it is.
fn format_matches(format: &str, text: &str) -> bool {
    match format {
        "uuid" | "uuid3" | "uuid4" | "uuid5" => uuid::Uuid::try_parse(text).is_ok(),
        "date-time" | "datetime" => {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .is_ok()
        }
        "date" => {
            let parts: Vec<&str> = text.split('-').collect();
            parts.len() == 3
                && parts[0].len() == 4
                && parts[1].len() == 2
                && parts[2].len() == 2
                && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
        }
        "ipv4" => text.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => text.parse::<std::net::Ipv6Addr>().is_ok(),
        "cidr" => text.split_once('/').is_some_and(|(ip, bits)| {
            ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok()
        }),
        "byte" => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .is_ok()
        }
        "hostname" => {
            !text.is_empty()
                && text.len() <= 255
                && text.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        }
        "mac" => {
            let parts: Vec<&str> = text.split([':', '-']).collect();
            parts.len() == 6
                && parts
                    .iter()
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn widget_schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["color"], "properties": {
                "replicas": {"type": "integer", "minimum": 0, "maximum": 10, "default": 1},
                "color": {"type": "string", "enum": ["red", "green", "blue"]},
                "size": {"type": "number", "exclusiveMinimum": true, "minimum": 0},
                "name": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "port": {"x-kubernetes-int-or-string": true},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "mode": {"type": "string", "default": "fast"},
                "nullable": {"type": "string", "nullable": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 3}},
                "tmpl": {"type": "object", "x-kubernetes-embedded-resource": true,
                         "x-kubernetes-preserve-unknown-fields": true},
            }},
            "status": {"type": "object", "properties": {"replicas": {"type": "integer"}}},
        }})
    }

    fn messages(object: Value) -> Vec<String> {
        let mut out: Vec<String> = validate(&widget_schema(), &object)
            .into_iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn messages_follow_kube_apiserver() {
        assert_eq!(
            messages(json!({"spec": {"color": "red", "replicas": "x"}})),
            [
                r#"spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string""#
            ]
        );
        assert_eq!(
            messages(
                json!({"spec": {"color": "pink", "replicas": 11, "size": 0, "name": "A",
                                     "tags": ["a", "b", "c"], "port": 1.5}})
            ),
            [
                r#"spec.color: Unsupported value: "pink": supported values: "red", "green", "blue""#,
                r#"spec.name: Invalid value: "A": spec.name in body should be at least 2 chars long"#,
                r#"spec.port: Invalid value: "number": spec.port in body must be of type integer,string: "number""#,
                r#"spec.replicas: Invalid value: 11: spec.replicas in body should be less than or equal to 10"#,
                r#"spec.size: Invalid value: 0: spec.size in body should be greater than 0"#,
                r#"spec.tags: Too many: 3: must have at most 2 items"#,
            ]
        );
        assert_eq!(
            messages(json!({"spec": {"name": "abcdefg"}})),
            [
                "spec.color: Required value",
                "spec.name: Too long: may not be more than 5 bytes"
            ]
        );
        assert_eq!(
            messages(
                json!({"spec": {"color": "red", "name": "AB1", "labels": {"b": 5},
                                     "tags": [1], "tmpl": {"foo": 1}}})
            ),
            [
                r#"spec.labels.b: Invalid value: "integer": spec.labels.b in body must be of type string: "integer""#,
                r#"spec.name: Invalid value: "AB1": spec.name in body should match '^[a-z]+$'"#,
                r#"spec.tags[0]: Invalid value: "integer": spec.tags[0] in body must be of type string: "integer""#,
                "spec.tmpl.apiVersion: Required value",
                "spec.tmpl.kind: Required value",
            ]
        );
        assert_eq!(
            messages(json!({"spec": "x"})),
            [r#"spec: Invalid value: "string": spec in body must be of type object: "string""#]
        );
        // Whole floats are integers; nullable takes null; int-or-string takes both.
        assert!(
            messages(
                json!({"spec": {"color": "red", "replicas": 2.0, "nullable": null, "port": "http"}})
            )
            .is_empty()
        );
    }

    #[test]
    fn formats_and_counts() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object",
            "minProperties": 1, "maxProperties": 4, "properties": {
                "list": {"type": "array", "minItems": 2, "items": {"type": "integer", "multipleOf": 2,
                         "maximum": 100, "exclusiveMaximum": true}},
                "id": {"type": "string", "format": "uuid"},
                "when": {"type": "string", "format": "date-time"},
                "ip": {"type": "string", "format": "ipv4"}}}}});
        let mut got: Vec<String> = validate(
            &schema,
            &json!({"spec": {"list": [3], "id": "nope", "when": "yesterday", "ip": "1.2.3", "x": 1}}),
        )
        .into_iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
        got.sort();
        assert_eq!(
            got,
            [
                r#"spec.id: Invalid value: "nope": spec.id in body must be of type uuid: "nope""#,
                r#"spec.ip: Invalid value: "1.2.3": spec.ip in body must be of type ipv4: "1.2.3""#,
                "spec.list: Invalid value: 1: spec.list in body should have at least 2 items",
                "spec.list[0]: Invalid value: 3: spec.list[0] in body should be a multiple of 2",
                r#"spec.when: Invalid value: "yesterday": spec.when in body must be of type date-time: "yesterday""#,
                "spec: Too many: 5: must have at most 4 items",
            ]
        );
        let got = validate(&schema, &json!({"spec": {}}));
        assert_eq!(
            got[0].message,
            "Invalid value: 0: spec in body should have at least 1 properties"
        );
        let got = validate(&schema, &json!({"spec": {"list": [2, 100]}}));
        assert_eq!(
            got[0].message,
            "Invalid value: 100: spec.list[1] in body should be less than 100"
        );
        assert!(
            validate(
                &schema,
                &json!({"spec": {"id": "8e813ff2-c608-4e25-b6cb-3772eb2cff40",
            "when": "2024-05-01T11:00:00Z", "ip": "10.0.0.1", "list": [2, 4]}})
            )
            .is_empty()
        );
    }

    #[test]
    fn pruning_reports_the_paths_it_drops() {
        let mut object = json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "junk": 1,
            "metadata": {"name": "w", "bogus": true, "labels": {"a": "b"}},
            "spec": {"color": "red", "unknown": 1, "extra": {"kept": {"deep": 1}},
                     "tags": ["a"], "labels": {"x": "y"},
                     "tmpl": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "odd": 1}, "any": 2}},
            "status": {"replicas": 1, "gone": true},
        });
        let mut dropped = prune(&widget_schema(), &mut object);
        dropped.sort();
        assert_eq!(
            dropped,
            [
                "junk",
                "metadata.bogus",
                "spec.tmpl.metadata.odd",
                "spec.unknown",
                "status.gone"
            ]
        );
        assert_eq!(object["spec"]["extra"]["kept"]["deep"], 1);
        assert_eq!(object["spec"]["tmpl"]["any"], 2);
        assert_eq!(object["metadata"]["labels"]["a"], "b");
        let list = json!({"type": "object", "properties": {"items": {"type": "array",
            "items": {"type": "object", "properties": {"a": {"type": "string"}}}}}});
        let mut object = json!({"items": [{"a": "x", "b": 1}]});
        assert_eq!(prune(&list, &mut object), ["items[0].b"]);
    }

    #[test]
    fn defaults_fill_absent_fields_and_nulls() {
        let mut object =
            json!({"spec": {"color": "red", "mode": null, "nullable": null, "tags": null}});
        apply_defaults(&widget_schema(), &mut object);
        assert_eq!(
            object["spec"],
            json!({"color": "red", "mode": "fast", "replicas": 1, "nullable": null})
        );
        let mut whole = json!({"a": [2.0, 1.5], "b": 3});
        normalize_numbers(&mut whole);
        assert_eq!(whole.to_string(), r#"{"a":[2,1.5],"b":3}"#);
    }
}
