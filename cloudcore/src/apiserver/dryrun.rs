//! `dryRun=All`: a write computed exactly as a real one (defaults, validation, generated
//! name, uid, creationTimestamp, admission checks), answered with what would have been stored,
//! and never written: no row, no resourceVersion, no watch event, no garbage collection.
//!
//! The decision is made once per request: `verbs` reads [`DryRun::from_request`] and runs the
//! whole verb inside [`DryRun::scope`]. Every store write of a verb goes through [`Writer`],
//! which reads the scope, so any code path under `verbs` (update, patch of every type,
//! server-side apply, the status, binding and scale subresources, delete, deletecollection)
//! is dry exactly when the request was, without passing a flag down each call.
//!
//! What a dry run answers, as kube-apiserver's `DryRunnableStorage`:
//! - create: the object with no `resourceVersion` (nothing was stored at any version);
//!   `AlreadyExists` when the name is taken.
//! - update and patch: the new object at the current `resourceVersion`; `NotFound` and
//!   `Conflict` (a stale precondition) as a real write.
//! - delete: the object as it would be after the call (with `deletionTimestamp` when the
//!   deletion would wait for finalizers or a grace period), still at its current version.

use std::collections::HashMap;
use std::future::Future;

use axum::http::Method;
use serde_json::Value;

use super::status::{ApiError, Cause};
use super::store::{ResourceId, Store, StoreError};

tokio::task_local! {
    /// The dry-run mode of the request this task serves.
    static DRY_RUN: DryRun;
}

/// Whether a write request is a dry run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DryRun {
    /// A real write.
    #[default]
    No,
    /// `dryRun=All`: every stage runs but the store is not written.
    All,
}

/// The `…Options.meta.k8s.io` kind that carries a verb's options, named in 422 answers.
pub fn options_kind(method: &Method) -> &'static str {
    match *method {
        Method::POST => "CreateOptions",
        Method::PUT => "UpdateOptions",
        Method::PATCH => "PatchOptions",
        Method::DELETE => "DeleteOptions",
        _ => "ListOptions",
    }
}

/// 422 for invalid request options, in kube-apiserver's shape:
/// `CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: ...`.
pub fn invalid_options(method: &Method, causes: Vec<Cause>) -> ApiError {
    let kind = options_kind(method);
    let mut e = ApiError::invalid(&format!("{kind}.meta.k8s.io"), "", causes);
    if let Some(details) = e.details.as_mut() {
        details.name = None;
        details.group = Some("meta.k8s.io".into());
        details.kind = Some(kind.into());
    }
    e
}

impl DryRun {
    /// The request's dry-run mode: the `dryRun` query parameter of a write, and for a delete
    /// also `dryRun` in the `DeleteOptions` body. Only `All` is a value; anything else is
    /// kube-apiserver's 422 naming the option kind. Reads (GET) ignore the parameter.
    pub fn from_request(
        method: &Method,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Result<DryRun, ApiError> {
        if !matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        ) {
            return Ok(DryRun::No);
        }
        let mut values: Vec<String> = query.get("dryRun").cloned().into_iter().collect();
        if *method == Method::DELETE
            && !body.is_empty()
            && let Ok(options) = serde_json::from_slice::<Value>(body)
        {
            // A malformed body is refused by the DeleteOptions parser with its own message.
            match &options["dryRun"] {
                Value::Array(items) => values.extend(
                    items
                        .iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from)),
                ),
                Value::Null => {}
                other => values.push(other.to_string()),
            }
        }
        if values.is_empty() {
            return Ok(DryRun::No);
        }
        if values.iter().all(|v| v == "All") {
            return Ok(DryRun::All);
        }
        let listed: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
        Err(invalid_options(
            method,
            vec![Cause {
                field: "dryRun".into(),
                message: format!(
                    "Unsupported value: [{}]: supported values: \"All\"",
                    listed.join(",")
                ),
            }],
        ))
    }

    /// The mode of the request being served (`No` outside any request scope).
    pub fn current() -> DryRun {
        DRY_RUN.try_with(|d| *d).unwrap_or_default()
    }

    /// Runs `verb` with this mode as the request's.
    pub async fn scope<F: Future>(self, verb: F) -> F::Output {
        DRY_RUN.scope(self, verb).await
    }

    /// Whether nothing may be written.
    pub fn is_dry(self) -> bool {
        self == DryRun::All
    }
}

/// The store as a verb writes to it: real writes, or under `dryRun=All` the same checks and
/// the answer a real write would give, with nothing written. Blocking, like [`Store`].
#[derive(Debug, Clone)]
pub struct Writer {
    store: Store,
    dry_run: DryRun,
}

impl Writer {
    /// A writer for the request being served (reads [`DryRun::current`]).
    pub fn new(store: &Store) -> Writer {
        Writer {
            store: store.clone(),
            dry_run: DryRun::current(),
        }
    }

    /// This writer's mode.
    pub fn dry_run(&self) -> DryRun {
        self.dry_run
    }

    /// [`Store::create`]; dry: `AlreadyExists` if the name is taken, else the object without a
    /// resourceVersion.
    pub fn create(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        mut object: Value,
    ) -> Result<Value, StoreError> {
        if !self.dry_run.is_dry() {
            return self.store.create(r, namespace, name, object);
        }
        if self.store.get(r, namespace, name)?.is_some() {
            return Err(StoreError::AlreadyExists);
        }
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        Ok(object)
    }

    /// [`Store::update`]; dry: the object at the current resourceVersion after the same
    /// existence and precondition checks.
    pub fn update(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        mut object: Value,
        expected: Option<u64>,
    ) -> Result<Value, StoreError> {
        if !self.dry_run.is_dry() {
            return self.store.update(r, namespace, name, object, expected);
        }
        let current = self.current(r, namespace, name, expected)?;
        object["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        Ok(object)
    }

    /// [`Store::delete`]; dry: the object as stored, after the same checks.
    pub fn delete(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        expected: Option<u64>,
    ) -> Result<Value, StoreError> {
        if !self.dry_run.is_dry() {
            return self.store.delete(r, namespace, name, expected);
        }
        self.current(r, namespace, name, expected)
    }

    /// The stored object, `NotFound` or `Conflict` as the store's own checks would answer.
    fn current(
        &self,
        r: &ResourceId,
        namespace: &str,
        name: &str,
        expected: Option<u64>,
    ) -> Result<Value, StoreError> {
        let current = self
            .store
            .get(r, namespace, name)?
            .ok_or(StoreError::NotFound)?;
        let rv = current["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_default();
        match expected {
            Some(expected) if expected != rv => Err(StoreError::Conflict {
                current: rv,
                expected,
            }),
            _ => Ok(current),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_all_is_a_dry_run_value() {
        let post = Method::POST;
        assert_eq!(
            DryRun::from_request(&post, &query(&[("dryRun", "All")]), b""),
            Ok(DryRun::All)
        );
        assert_eq!(
            DryRun::from_request(&post, &query(&[]), b""),
            Ok(DryRun::No)
        );
        // A read ignores it, as GetOptions and ListOptions have no dryRun.
        assert_eq!(
            DryRun::from_request(&Method::GET, &query(&[("dryRun", "x")]), b""),
            Ok(DryRun::No)
        );
        let e =
            DryRun::from_request(&post, &query(&[("dryRun", "Bogus")]), b"").expect_err("bogus");
        assert_eq!((e.code.as_u16(), e.reason), (422, "Invalid"));
        assert_eq!(
            e.message,
            "CreateOptions.meta.k8s.io \"\" is invalid: dryRun: Unsupported value: [\"Bogus\"]: supported values: \"All\""
        );
        let status = e.to_status();
        assert_eq!(status["details"]["kind"], "CreateOptions");
        assert_eq!(status["details"]["group"], "meta.k8s.io");
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueNotSupported"
        );
    }

    #[test]
    fn delete_options_in_the_body_count() {
        let delete = Method::DELETE;
        assert_eq!(
            DryRun::from_request(&delete, &query(&[]), br#"{"dryRun":["All"]}"#),
            Ok(DryRun::All)
        );
        let e = DryRun::from_request(&delete, &query(&[]), br#"{"dryRun":["Nope"]}"#)
            .expect_err("nope");
        assert!(
            e.message
                .starts_with("DeleteOptions.meta.k8s.io \"\" is invalid: dryRun"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn a_dry_writer_answers_like_the_store_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("api.db"), Default::default()).expect("open");
        let id = ResourceId {
            group: String::new(),
            resource: "configmaps".into(),
        };
        let cm = |name: &str| json!({"metadata": {"name": name, "namespace": "ns"}});
        let stored = store.create(&id, "ns", "a", cm("a")).expect("create");
        let rv = store.resource_version();
        let mut watch = store.watch(&id, None, rv).expect("watch");
        let writer = DryRun::All.scope(async { Writer::new(&store) }).await;
        assert_eq!(writer.dry_run(), DryRun::All);

        let created = writer.create(&id, "ns", "b", cm("b")).expect("dry create");
        assert!(created["metadata"].get("resourceVersion").is_none());
        assert!(matches!(
            writer.create(&id, "ns", "a", cm("a")),
            Err(StoreError::AlreadyExists)
        ));
        let mut changed = stored.clone();
        changed["data"] = json!({"k": "v"});
        let updated = writer
            .update(&id, "ns", "a", changed.clone(), Some(rv))
            .expect("dry update");
        assert_eq!(updated["data"]["k"], "v");
        assert_eq!(updated["metadata"]["resourceVersion"], rv.to_string());
        assert!(matches!(
            writer.update(&id, "ns", "a", changed, Some(rv + 7)),
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            writer.delete(&id, "ns", "missing", None),
            Err(StoreError::NotFound)
        ));
        assert_eq!(
            writer.delete(&id, "ns", "a", None).expect("dry delete"),
            stored
        );

        assert_eq!(store.resource_version(), rv, "nothing was written");
        assert_eq!(store.get(&id, "ns", "a").expect("get"), Some(stored));
        assert_eq!(store.get(&id, "ns", "b").expect("get"), None);
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(100), watch.next()).await;
        assert!(quiet.is_err(), "a dry run sent a watch event: {quiet:?}");
        // Outside a dry scope the writer writes.
        Writer::new(&store)
            .create(&id, "ns", "c", cm("c"))
            .expect("real create");
        assert_eq!(store.resource_version(), rv + 1);
    }
}
