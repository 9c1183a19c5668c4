//! API errors as Kubernetes `Status` bodies, so kubectl and kube-rs show the right message and
//! act on the reason (NotFound, AlreadyExists, Conflict, Gone, ...).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::store::StoreError;

/// `pods` or `leases.coordination.k8s.io`: how the apiserver names a resource in messages.
fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// One field-level validation failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub field: String,
    pub message: String,
}

/// `details` of a `Status`: the object's name, group, kind and field causes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Details {
    pub name: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    pub causes: Vec<Cause>,
}

/// A failed request, answered with a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
    /// Boxed: most errors have none, and `Result<_, ApiError>` stays small.
    pub details: Option<Box<Details>>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// The field causes of a validation error.
    pub fn causes(&self) -> &[Cause] {
        self.details.as_ref().map_or(&[], |d| d.causes.as_slice())
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// `plural "name" is forbidden: why`, the apiserver's wording for an admission refusal.
    pub fn forbidden_object(group: &str, plural: &str, name: &str, why: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{what} \"{name}\" is forbidden: {why}"),
        )
        .with_details(name, group, plural)
    }

    /// 413, kube-apiserver's answer to a body over its limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 504 for a resourceVersion newer than the store's, as the apiserver answers.
    pub fn too_large_resource_version(requested: u64, current: u64) -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!("Timeout: Too large resource version: {requested}, current: {current}"),
        );
        e.details = Some(Box::new(Details {
            causes: vec![Cause {
                field: String::new(),
                message: "Too large resource version".into(),
            }],
            ..Details::default()
        }));
        e
    }

    /// 422 for invalid list options (`ListOptions.meta.k8s.io "" is invalid: ...`).
    pub fn invalid_list_options(causes: Vec<Cause>) -> Self {
        let mut e = Self::invalid("ListOptions.meta.k8s.io", "", causes);
        if let Some(details) = e.details.as_mut() {
            details.name = None;
            details.group = Some("meta.k8s.io".into());
            details.kind = Some("ListOptions".into());
        }
        e
    }

    /// `plural "name" not found`, the apiserver's wording.
    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{what} \"{name}\" not found"),
        )
        .with_details(name, group, plural)
    }

    /// A path that names no resource.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{what} \"{name}\" already exists"),
        )
        .with_details(name, group, plural)
    }

    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on {what} \"{name}\": {why}"),
        )
        .with_details(name, group, plural)
    }

    /// 422 with field causes.
    pub fn invalid(kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let summary: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {}", summary.join(", ")),
        );
        e.details = Some(Box::new(Details {
            name: Some(name.to_string()),
            group: None,
            kind: Some(kind.to_string()),
            causes,
        }));
        e
    }

    /// 422 with field causes for an object of `kind` in API `group`: kube-apiserver names it
    /// `Kind.group` in the message (`CronJob.batch "x" is invalid: ...`), `Kind` alone in the
    /// core group, and puts both in the details.
    pub fn invalid_in(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let mut e = Self::invalid(&qualified, name, causes);
        if let Some(details) = e.details.as_mut() {
            details.kind = Some(kind.to_string());
            details.group = (!group.is_empty()).then(|| group.to_string());
        }
        e
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "Expired", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            message,
        )
    }

    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_ACCEPTABLE, "NotAcceptable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    /// 507 with a message saying the disk is full; nothing was written.
    pub fn insufficient_storage(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INSUFFICIENT_STORAGE, "InternalError", message)
    }

    /// A failure known only by its HTTP code and message (a stream the edge refused, a
    /// transport rejection): the reason is the one Kubernetes gives that code.
    pub fn from_code(code: u16, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let reason = match status.as_u16() {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(status, reason, message)
    }

    fn with_details(mut self, name: &str, group: &str, plural: &str) -> Self {
        self.details = Some(Box::new(Details {
            name: Some(name.to_string()),
            group: Some(group.to_string()),
            kind: Some(plural.to_string()),
            causes: Vec::new(),
        }));
        self
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut details = serde_json::Map::new();
        let d = self.details.as_deref().cloned().unwrap_or_default();
        if let Some(name) = &d.name {
            details.insert("name".into(), json!(name));
        }
        if let Some(group) = &d.group {
            details.insert("group".into(), json!(group));
        }
        if let Some(kind) = &d.kind {
            details.insert("kind".into(), json!(kind));
        }
        if !d.causes.is_empty() {
            details.insert(
                "causes".into(),
                d.causes
                    .iter()
                    .map(|c| {
                        let mut cause =
                            json!({"reason": cause_reason(&c.message), "message": c.message});
                        if !c.field.is_empty() {
                            cause["field"] = json!(c.field);
                        }
                        cause
                    })
                    .collect(),
            );
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }

    /// Maps a store failure for object `name` of `plural` in `group`.
    pub fn from_store(e: StoreError, group: &str, plural: &str, name: &str) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(group, plural, name),
            StoreError::AlreadyExists => Self::already_exists(group, plural, name),
            StoreError::Conflict { .. } => Self::conflict(
                group,
                plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ),
            StoreError::Gone { requested, oldest } => {
                Self::gone(format!("too old resource version: {requested} ({oldest})"))
            }
            StoreError::DiskFull { path } => Self::insufficient_storage(format!(
                "the API store {} is out of disk space; nothing was written",
                path.display()
            )),
            StoreError::InvalidObject(why) => Self::bad_request(why),
            other => {
                tracing::error!(error = %other, "API store failure");
                Self::internal(format!("storage error: {other}"))
            }
        }
    }
}

/// The `CauseType` Kubernetes gives a field error, from the start of its message.
fn cause_reason(message: &str) -> &'static str {
    [
        ("Required value", "FieldValueRequired"),
        ("Unsupported value", "FieldValueNotSupported"),
        ("Duplicate value", "FieldValueDuplicate"),
        ("Forbidden", "FieldValueForbidden"),
        ("Too large resource version", "ResourceVersionTooLarge"),
        ("conflict with ", "FieldManagerConflict"),
        ("Too long", "FieldValueTooLong"),
    ]
    .iter()
    .find(|(prefix, _)| message.starts_with(prefix))
    .map_or("FieldValueInvalid", |(_, reason)| reason)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.to_status().to_string(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_reads_like_the_apiserver() {
        let status = ApiError::not_found("", "pods", "web").to_status();
        assert_eq!(status["message"], "pods \"web\" not found");
        assert_eq!(status["reason"], "NotFound");
        assert_eq!(status["code"], 404);
        assert_eq!(status["details"]["name"], "web");
        let status = ApiError::not_found("coordination.k8s.io", "leases", "n1").to_status();
        assert_eq!(
            status["message"],
            "leases.coordination.k8s.io \"n1\" not found"
        );
    }

    #[test]
    fn invalid_lists_causes() {
        let e = ApiError::invalid(
            "Pod",
            "Bad_Name",
            vec![Cause {
                field: "metadata.name".into(),
                message: "must be a lowercase RFC 1123 subdomain".into(),
            }],
        );
        let status = e.to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(status["details"]["causes"][0]["field"], "metadata.name");
        assert!(
            status["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Pod \"Bad_Name\" is invalid")
        );
    }

    #[test]
    fn invalid_names_the_group_qualified_kind() {
        let cause = || Cause {
            field: "spec.schedule".into(),
            message: "Required value".into(),
        };
        let status = ApiError::invalid_in("batch", "CronJob", "x", vec![cause()]).to_status();
        assert_eq!(
            status["message"],
            "CronJob.batch \"x\" is invalid: spec.schedule: Required value"
        );
        assert_eq!(status["details"]["kind"], "CronJob");
        assert_eq!(status["details"]["group"], "batch");
        let status = ApiError::invalid_in("", "Pod", "p", vec![cause()]).to_status();
        assert!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Pod \"p\" is invalid")),
            "{status}"
        );
        assert!(status["details"]["group"].is_null(), "{status}");
    }
}
