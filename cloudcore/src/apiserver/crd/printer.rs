//! Server-side Tables of custom resources: the `additionalPrinterColumns` of the served
//! version (or the default Name and Age), with the JSONPath subset they are written in.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::apiserver::resources::{self, TableOptions};

/// One printer column of a CRD version.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    /// `integer`, `number`, `string`, `boolean` or `date`.
    pub kind: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub path: JsonPath,
}

impl PrinterColumn {
    /// Reads `spec.versions[*].additionalPrinterColumns[*]`; `None` if its JSONPath is not one
    /// this server evaluates (the definition is refused before that, see [`JsonPath::parse`]).
    pub fn from_definition(column: &Value) -> Option<PrinterColumn> {
        let path_text = column["jsonPath"].as_str()?;
        Some(PrinterColumn {
            name: column["name"].as_str()?.to_string(),
            kind: column["type"].as_str().unwrap_or("string").to_string(),
            format: column["format"].as_str().unwrap_or_default().to_string(),
            description: column["description"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| {
                    format!("Custom resource definition column (in JSONPath format): {path_text}")
                }),
            priority: column["priority"].as_i64().unwrap_or(0),
            path: JsonPath::parse(path_text).ok()?,
        })
    }

    /// kube-apiserver's column when a version declares none: the object's age.
    pub fn age() -> PrinterColumn {
        PrinterColumn {
            name: "Age".into(),
            kind: "date".into(),
            format: String::new(),
            description: "Custom resource definition column (in JSONPath format): .metadata.creationTimestamp".into(),
            priority: 0,
            path: JsonPath::parse(".metadata.creationTimestamp").unwrap_or(JsonPath(Vec::new())),
        }
    }

    fn cell(&self, object: &Value, now: OffsetDateTime) -> Value {
        let Some(value) = self.path.first(object) else {
            return Value::Null;
        };
        match (self.kind.as_str(), value) {
            (_, Value::Null) => Value::Null,
            ("integer", Value::Number(n)) => match n.as_i64() {
                Some(i) => json!(i),
                None => n
                    .as_f64()
                    .filter(|f| f.fract() == 0.0)
                    .map_or(Value::Null, |f| json!(f as i64)),
            },
            ("number", Value::Number(_)) => value.clone(),
            ("boolean", Value::Bool(_)) => value.clone(),
            ("date", Value::String(text)) => match resources::parse_timestamp(text) {
                Some(at) => json!(resources::human_duration(now - at)),
                None => Value::Null,
            },
            ("string", Value::String(s)) => json!(s),
            ("string", other) => json!(other.to_string()),
            _ => Value::Null,
        }
    }
}

/// One step of a printer column's JSONPath.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    /// `[?(@.a.b=="x")]` (or `!=`): the array elements whose field compares so.
    Filter {
        field: Vec<String>,
        equal: bool,
        literal: Value,
    },
}

/// The JSONPath subset printer columns use: `.a.b`, `['a.b']`, `[0]`, `[*]` and filters
/// `[?(@.a=="x")]` / `!=` with a string, number or boolean literal.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonPath(Vec<Step>);

impl JsonPath {
    /// Parses a column's `jsonPath` (with or without `{…}` around it).
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let body = text
            .trim()
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(text.trim());
        let body = body.strip_prefix('$').unwrap_or(body);
        let chars: Vec<char> = body.chars().collect();
        let mut steps = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '.' => {
                    let start = i + 1;
                    let mut end = start;
                    while end < chars.len() && chars[end] != '.' && chars[end] != '[' {
                        end += 1;
                    }
                    if end == start {
                        return Err(format!("empty field name at {i} in {text:?}"));
                    }
                    steps.push(Step::Field(chars[start..end].iter().collect()));
                    i = end;
                }
                '[' => {
                    let close = find_close(&chars, i)
                        .ok_or_else(|| format!("unterminated [ in {text:?}"))?;
                    let inner: String = chars[i + 1..close].iter().collect();
                    steps.push(bracket(inner.trim()).ok_or_else(|| {
                        format!("unsupported JSONPath expression [{inner}] in {text:?}")
                    })?);
                    i = close + 1;
                }
                _ => return Err(format!("unexpected {:?} in JSONPath {text:?}", chars[i])),
            }
        }
        if steps.is_empty() {
            return Err(format!("empty JSONPath {text:?}"));
        }
        Ok(JsonPath(steps))
    }

    /// The first value the path selects, if any.
    pub fn first<'a>(&self, object: &'a Value) -> Option<&'a Value> {
        let mut current = vec![object];
        for step in &self.0 {
            let mut next = Vec::new();
            for value in current {
                match step {
                    Step::Field(name) => next.extend(value.get(name.as_str())),
                    Step::Index(i) => next.extend(value.get(*i)),
                    Step::All => match value {
                        Value::Array(items) => next.extend(items.iter()),
                        Value::Object(map) => next.extend(map.values()),
                        _ => {}
                    },
                    Step::Filter {
                        field,
                        equal,
                        literal,
                    } => {
                        for item in value.as_array().into_iter().flatten() {
                            let mut at = Some(item);
                            for f in field {
                                at = at.and_then(|v| v.get(f.as_str()));
                            }
                            if at.is_some_and(|v| (v == literal) == *equal) {
                                next.push(item);
                            }
                        }
                    }
                }
            }
            current = next;
        }
        current.into_iter().next()
    }
}

fn find_close(chars: &[char], open: usize) -> Option<usize> {
    let mut quote: Option<char> = None;
    for (j, &c) in chars.iter().enumerate().skip(open + 1) {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, ']') => return Some(j),
            _ => {}
        }
    }
    None
}

fn bracket(inner: &str) -> Option<Step> {
    if inner == "*" {
        return Some(Step::All);
    }
    if let Ok(i) = inner.parse::<usize>() {
        return Some(Step::Index(i));
    }
    if let Some(quoted) = inner
        .strip_prefix('\'')
        .and_then(|t| t.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|t| t.strip_suffix('"')))
    {
        return Some(Step::Field(quoted.to_string()));
    }
    let expr = inner.strip_prefix("?(")?.strip_suffix(')')?.trim();
    let (lhs, equal, rhs) = if let Some((l, r)) = expr.split_once("==") {
        (l, true, r)
    } else {
        let (l, r) = expr.split_once("!=")?;
        (l, false, r)
    };
    let field: Vec<String> = lhs
        .trim()
        .strip_prefix("@.")?
        .split('.')
        .map(String::from)
        .collect();
    let rhs = rhs.trim();
    let literal = if let Some(s) = rhs
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .or_else(|| rhs.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')))
    {
        Value::String(s.to_string())
    } else {
        serde_json::from_str(rhs).ok()?
    };
    Some(Step::Filter {
        field,
        equal,
        literal,
    })
}

/// The Table of custom resources: Name, then the version's columns (the default Age when it
/// declares none). Priority above 0 is left to kubectl to show with `-o wide` only.
pub fn table(
    columns: &[PrinterColumn],
    objects: &[Value],
    list_rv: &str,
    now: OffsetDateTime,
    options: TableOptions,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![json!(
                object["metadata"]["name"].as_str().unwrap_or_default()
            )];
            cells.extend(columns.iter().map(|c| c.cell(object, now)));
            let mut row = Map::new();
            row.insert("cells".into(), Value::Array(cells));
            if let Some(object) = resources::row_object(object, options.include_object) {
                row.insert("object".into(), object);
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
        let mut definitions = vec![json!({
            "name": "Name", "type": "string", "format": "name", "priority": 0,
            "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated.",
        })];
        definitions.extend(columns.iter().map(|c| {
            json!({"name": c.name, "type": c.kind, "format": c.format,
                   "description": c.description, "priority": c.priority})
        }));
        table["columnDefinitions"] = Value::Array(definitions);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_subset() {
        let object = json!({"spec": {"replicas": 3, "items": [{"n": "a"}, {"n": "b"}], "a.b": 1},
            "status": {"conditions": [{"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        let first = |p: &str| JsonPath::parse(p).expect(p).first(&object).cloned();
        assert_eq!(first(".spec.replicas"), Some(json!(3)));
        assert_eq!(first("{.spec.items[1].n}"), Some(json!("b")));
        assert_eq!(first(".spec.items[*].n"), Some(json!("a")));
        assert_eq!(first(".spec['a.b']"), Some(json!(1)));
        assert_eq!(
            first(r#".status.conditions[?(@.type=="Ready")].status"#),
            Some(json!("True"))
        );
        assert_eq!(
            first(r#".status.conditions[?(@.type!="Ready")].status"#),
            Some(json!("False"))
        );
        assert_eq!(first(".spec.missing"), None);
        assert!(JsonPath::parse(".spec..x").is_err());
        assert!(JsonPath::parse(".spec[?(@.x > 1)]").is_err());
    }

    #[test]
    fn cells_take_the_column_type() {
        let now = resources::parse_timestamp("2024-05-01T12:00:00Z").expect("time");
        let column = |kind: &str, path: &str| {
            PrinterColumn::from_definition(&json!({"name": "C", "type": kind, "jsonPath": path}))
                .expect("column")
        };
        let object = json!({"metadata": {"name": "w", "creationTimestamp": "2024-05-01T11:00:00Z"},
            "spec": {"replicas": 2.0, "size": 1.5, "on": true, "color": "red", "list": [1]}});
        assert_eq!(
            column("integer", ".spec.replicas").cell(&object, now),
            json!(2)
        );
        assert_eq!(
            column("integer", ".spec.color").cell(&object, now),
            Value::Null
        );
        assert_eq!(
            column("number", ".spec.size").cell(&object, now),
            json!(1.5)
        );
        assert_eq!(
            column("boolean", ".spec.on").cell(&object, now),
            json!(true)
        );
        assert_eq!(
            column("string", ".spec.list").cell(&object, now),
            json!("[1]")
        );
        assert_eq!(PrinterColumn::age().cell(&object, now), json!("60m"));
        let t = table(
            &[column("string", ".spec.color")],
            &[object],
            "5",
            now,
            TableOptions::default(),
        );
        assert_eq!(t["rows"][0]["cells"], json!(["w", "red"]));
        assert_eq!(t["columnDefinitions"][1]["name"], "C");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
