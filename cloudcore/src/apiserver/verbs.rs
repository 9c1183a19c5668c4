//! The HTTP handler: authentication, routing, and the verbs (get, list, watch, create, update,
//! patch, delete) with Kubernetes semantics on top of [`Store`].

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::dryrun::{self, DryRun, Writer};
use super::objects::{parse_rv, resource_id, rv_of};
use super::pagination::{self, Paging};
use super::patch::{self, PatchError, PatchType};
use super::request::{ResourceRequest, Target, route};
use super::resources::{self, FieldSelector, LabelSelector, ResourceInfo};
use super::server::User;
use super::status::{ApiError, Cause};
use super::store::{EventType, ResourceId, Scan, Store, StoreError, WatchEvent};
use super::validation::{self, FieldValidation};
use super::{apply, crd, discovery, gc, metrics_api, objects, streaming};

/// Shared state of the API handlers.
#[derive(Debug)]
pub struct Api {
    pub store: Store,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The checks behind `/livez`, `/readyz` and `/healthz`.
    pub health: daemon::health::Health,
    /// Where `pods/log`, `exec`, `attach`, `portforward` and `metrics.k8s.io` reach edges.
    pub streams: Arc<crate::streams::Streams>,
    /// Cluster IPs and node ports of Services; every Service write holds its lock.
    pub services: Arc<super::services::Allocator>,
}

/// Whether writes of `info` (and `subresource`) allocate Service addresses and ports.
fn allocates(info: &ResourceInfo, subresource: Option<&str>) -> bool {
    info.group.is_empty() && info.plural == "services" && subresource.is_none()
}

type Query = HashMap<String, String>;

/// The largest request body accepted: kube-apiserver's 3 MiB (`MaxRequestBodyBytes`).
pub const MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;
/// How much of an oversized body is read and discarded before answering, so that the client
/// finishes sending and reads the 413 instead of seeing its stream reset.
const OVERSIZED_BODY_DRAIN: usize = 4 * MAX_REQUEST_BODY;

/// Reads the request body up to [`MAX_REQUEST_BODY`]; over it, a 413 `Status`.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        seen += chunk.len();
        if seen <= MAX_REQUEST_BODY {
            buffer.extend_from_slice(&chunk);
        } else if seen > OVERSIZED_BODY_DRAIN || declared.is_some_and(|n| n > OVERSIZED_BODY_DRAIN)
        {
            break;
        }
    }
    if seen > MAX_REQUEST_BODY || declared.is_some_and(|n| n > MAX_REQUEST_BODY) {
        return Err(ApiError::too_large(MAX_REQUEST_BODY));
    }
    Ok(Bytes::from(buffer))
}

/// `?resourceVersion=`: absent or empty is `None`; anything but a decimal unsigned integer is
/// a 400, kube-apiserver's answer to an unparseable resourceVersion on a list.
fn query_rv(query: &Query) -> Result<Option<u64>, ApiError> {
    match query.get("resourceVersion").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(text) => parse_rv(text).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid resource version: resourceVersion: Invalid value: {text:?}: must be an unsigned decimal integer"
            ))
        }),
    }
}

pub(crate) fn query_of(uri: &Uri) -> Result<Query, ApiError> {
    let Some(query) = uri.query() else {
        return Ok(Query::new());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
    Ok(pairs.into_iter().collect())
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    json_text(code, value.to_string())
}

/// A JSON answer already serialized.
fn json_text(code: StatusCode, text: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

pub(crate) fn table_options(query: &Query) -> resources::TableOptions {
    resources::TableOptions {
        include_object: query
            .get("includeObject")
            .and_then(|v| resources::IncludeObject::parse(v))
            .unwrap_or_default(),
        no_headers: false,
    }
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

/// The single entry point for every API request.
pub async fn handle(State(api): State<Arc<Api>>, request: Request) -> Response {
    let user = request
        .extensions()
        .get::<User>()
        .cloned()
        .unwrap_or(User::Anonymous);
    let method = request.method().clone();
    let uri = request.uri().clone();
    // As kube-apiserver's `system:public-info-viewer` role: anyone may read the health
    // endpoints and the version, so probes and load balancers need no client certificate.
    if method == Method::GET && is_public_info(uri.path()) {
        return match dispatch(&api, method, &uri, request.headers(), Bytes::new()).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
    }
    if let Err(e) = authorize(&user) {
        return e.into_response();
    }
    // Logs, exec, attach and port-forward need the whole request (an upgrade rides in its
    // extensions) and must not have their body read.
    if let Ok(Target::PodStream(target)) = route(uri.path()) {
        return streaming::handle(api, target, request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    match dispatch(&api, method, &uri, &parts.headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// Anonymous users get a 401; only `system:masters` is authorized for now, anyone else a 403.
fn authorize(user: &User) -> Result<(), ApiError> {
    match user {
        User::Anonymous => Err(ApiError::unauthorized()),
        User::Authenticated { .. } if user.is_master() => Ok(()),
        User::Authenticated { name, .. } => Err(ApiError::forbidden(format!(
            "user {name:?} may not use the embedded API (only system:masters is authorized here)"
        ))),
    }
}

/// Paths kube-apiserver lets everyone read (`system:public-info-viewer`).
fn is_public_info(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    ["/livez", "/readyz", "/healthz"].iter().any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    }) || path == "/version"
}

async fn dispatch(
    api: &Arc<Api>,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let target = route(uri.path())?;
    if method != Method::GET && !matches!(target, Target::Resource(_)) {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on {}",
            uri.path()
        )));
    }
    let doc = |v: Option<Value>| {
        v.map(|v| json_response(StatusCode::OK, &v))
            .ok_or_else(|| ApiError::no_route(uri.path()))
    };
    match target {
        Target::Version => doc(Some(discovery::version())),
        Target::Health(endpoint) => {
            Ok(super::health_response(&api.health, endpoint, uri.query()).await)
        }
        Target::CoreVersions => doc(Some(discovery::api_versions())),
        Target::Groups => doc(Some(discovery::api_group_list())),
        Target::Group(group) => doc(discovery::api_group_list()["groups"]
            .as_array()
            .and_then(|groups| groups.iter().find(|g| g["name"] == group.as_str()))
            .map(|g| {
                let mut g = g.clone();
                g["kind"] = json!("APIGroup");
                g["apiVersion"] = json!("v1");
                g
            })),
        Target::ResourceList { group, version } => doc(discovery::resource_list(&group, &version)),
        Target::OpenApiV3Index => doc(Some(discovery::openapi_v3_index())),
        Target::OpenApiV3 { group, version } => {
            doc(discovery::openapi_v3_group_version(&group, &version))
        }
        Target::OpenApiV2 => {
            let protobuf = headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("proto-openapi"));
            if protobuf {
                Ok((
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        discovery::OPENAPI_V2_PROTOBUF_CONTENT_TYPE,
                    )],
                    discovery::openapi_v2_protobuf(),
                )
                    .into_response())
            } else {
                doc(Some(discovery::openapi_v2()))
            }
        }
        Target::Resource(request) => {
            let query = query_of(uri)?;
            resource(api, method, request, query, headers, body).await
        }
        Target::Metrics(request) => {
            let query = query_of(uri)?;
            metrics_api::serve(api, request, &query).await
        }
        // Served by `handle` before the body is read.
        Target::PodStream(_) => Err(ApiError::internal(
            "a pod stream request reached the object handler",
        )),
    }
}

async fn resource(
    api: &Arc<Api>,
    method: Method,
    request: ResourceRequest,
    query: Query,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Decided once for the whole verb: every store write below goes through
    // `dryrun::Writer`, which reads this scope.
    let dry_run = DryRun::from_request(&method, &query, &body)?;
    dry_run
        .scope(verb(api, method, request, query, headers, body))
        .await
}

async fn verb(
    api: &Arc<Api>,
    method: Method,
    request: ResourceRequest,
    query: Query,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let manager = apply::field_manager(&query, headers);
    let options = match method {
        Method::POST => Some("CreateOptions"),
        Method::PUT => Some("UpdateOptions"),
        Method::PATCH => Some("PatchOptions"),
        _ => None,
    };
    if let Some(options) = options {
        apply::check_field_manager(options, &query)?;
    }
    if request.subresource.as_deref() == Some("scale") && crd::is_custom(request.info) {
        return crd::serve_scale(api, method, &request, headers, &body, &manager).await;
    }
    if request.subresource.as_deref() == Some("scale") {
        return super::scale::serve(api, method, &request, headers, &body, &manager).await;
    }
    match (&method, &request.name) {
        (&Method::GET, None) if watch => watch_collection(api, &request, &query, headers).await,
        (&Method::GET, None) => list(api, &request, &query, headers).await,
        (&Method::GET, Some(name)) => get(api, &request, name, &query, headers).await,
        (&Method::POST, None) => create(api, &request, &query, &body, &manager).await,
        (&Method::POST, Some(name)) if request.subresource.as_deref() == Some("binding") => {
            bind(api, &request, name, &body).await
        }
        (&Method::PUT, Some(name)) => update(api, &request, name, &query, &body, &manager).await,
        (&Method::PATCH, Some(name)) => {
            patch_object(api, &request, name, &query, headers, &body, &manager).await
        }
        (&Method::DELETE, Some(name)) => delete(api, &request, name, &query, &body).await,
        (&Method::DELETE, None) => delete_collection(api, &request, &query).await,
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {}",
            request.info.plural
        ))),
    }
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("storage task failed: {e}")))
}

pub(crate) fn selectors(
    query: &Query,
) -> Result<(Option<LabelSelector>, Option<FieldSelector>), ApiError> {
    let labels = match query.get("labelSelector").filter(|s| !s.is_empty()) {
        Some(s) => Some(LabelSelector::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?),
        None => None,
    };
    let fields = match query.get("fieldSelector").filter(|s| !s.is_empty()) {
        Some(s) => Some(FieldSelector::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?),
        None => None,
    };
    Ok((labels, fields))
}

/// Rejects field selectors the kind does not support, even when nothing would match.
pub(crate) fn check_fields(
    info: &ResourceInfo,
    fields: &Option<FieldSelector>,
) -> Result<(), ApiError> {
    match fields {
        Some(f) => f
            .validate(info.kind)
            .map_err(|e| ApiError::bad_request(e.to_string())),
        None => Ok(()),
    }
}

fn matches(
    info: &ResourceInfo,
    labels: &Option<LabelSelector>,
    fields: &Option<FieldSelector>,
    object: &Value,
) -> Result<bool, ApiError> {
    if let Some(selector) = labels {
        let object_labels: BTreeMap<String, String> = object["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        if !selector.matches(&object_labels) {
            return Ok(false);
        }
    }
    if let Some(selector) = fields {
        return selector
            .matches(info.kind, object)
            .map_err(|e| ApiError::bad_request(e.to_string()));
    }
    Ok(true)
}

async fn list(
    api: &Arc<Api>,
    request: &ResourceRequest,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    check_fields(request.info, &fields)?;
    let exact = list_version(query)?;
    let paging = Paging::from_query(query)?;
    let store = api.store.clone();
    let id = resource_id(request.info);
    let namespace = request.namespace.clone();
    if let Some(requested) = exact {
        check_exact(api, &id, namespace.as_deref(), requested).await?;
    }
    // A continued list is served at its first page's version, an exact one at the version
    // asked for (both rebuilt from the event history), any other at the latest.
    let at = paging.from.as_ref().and_then(|from| from.rv).or(exact);
    let info = request.info;
    let across_namespaces = request.namespace.is_none();
    let counted = labels.is_none() && fields.is_none();
    let table = wants_table(headers);
    // Objects every item of which is answered exactly as stored (no selector to test, no
    // Table to build, no custom resource version to present) are passed on as their stored
    // JSON text, never parsed: after a restart every watcher lists its collections at once,
    // and parsing each object and serializing the tree again was most of that work.
    let as_stored = counted && !table && !crd::presents(info);
    // The store hands over one object at a time and the pager keeps at most a page, so a
    // paged list of a large collection never holds the collection (kube-rs' watchers list in
    // pages of 500).
    let scanned = {
        let paging = paging.clone();
        let api_version = info.api_version();
        let list_kind = format!("{}List", info.kind);
        blocking(move || -> Result<Listed, StoreError> {
            let from_key = paging.from.as_ref().map(|from| from.start.clone());
            let scan = Scan {
                namespace: namespace.as_deref(),
                at,
                from_key: from_key.as_deref().map(|start| (start, across_namespaces)),
            };
            if as_stored {
                let mut pager = pagination::Pager::new(&paging, across_namespaces, counted);
                let rv = store.scan_rows(&id, scan, |row| {
                    // Without a selector every item matches: one past a full page is only
                    // counted (for `remainingItemCount`), never read.
                    if pager.keeps(row.namespace, row.name) {
                        pager.push_at(row.namespace, row.name, row.raw()?);
                    }
                    Ok(ControlFlow::Continue(()))
                })?;
                return Ok(Listed::Text(list_body(
                    &api_version,
                    &list_kind,
                    rv,
                    pager.finish(rv),
                )));
            }
            let mut pager = pagination::Pager::new(&paging, across_namespaces, counted);
            let mut refused = None;
            let rv = store.scan_rows(&id, scan, |row| {
                // Rows come in key order, so one past a full page means the list goes on.
                // Without a selector it is only counted (for `remainingItemCount`); with one,
                // the page ends there unread, as kube-apiserver stops reading etcd once a page
                // is full (its next page may then hold nothing).
                if !pager.keeps(row.namespace, row.name) {
                    return Ok(if counted {
                        ControlFlow::Continue(())
                    } else {
                        ControlFlow::Break(())
                    });
                }
                let mut object = row.object()?;
                match matches(info, &labels, &fields, &object) {
                    Ok(true) => {
                        crd::present(info, &mut object);
                        pager.push(object);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        refused = Some(e);
                        return Ok(ControlFlow::Break(()));
                    }
                }
                Ok(ControlFlow::Continue(()))
            })?;
            Ok(match refused {
                Some(refused) => Listed::Refused(refused),
                None => Listed::Objects(rv, pager.finish(rv)),
            })
        })
        .await?
    };
    let (rv, page) = match scanned {
        Ok(Listed::Text(body)) => {
            let body =
                body.map_err(|e| ApiError::internal(format!("cannot write the list: {e}")))?;
            return Ok(json_text(StatusCode::OK, body));
        }
        Ok(Listed::Refused(refused)) => return Err(refused),
        Ok(Listed::Objects(rv, page)) => (rv, page),
        Err(StoreError::Gone { .. }) if at.is_some() => {
            return match &paging.from {
                Some(from) => Ok(json_response(StatusCode::GONE, &pagination::expired(from))),
                None => Err(ApiError::gone(
                    "The resourceVersion for the provided list is too old.",
                )),
            };
        }
        Err(e) => {
            return Err(ApiError::from_store(
                e,
                request.info.group,
                request.info.plural,
                "",
            ));
        }
    };
    if !table {
        let body = list_body(&info.api_version(), &format!("{}List", info.kind), rv, page)
            .map_err(|e| ApiError::internal(format!("cannot write the list: {e}")))?;
        return Ok(json_text(StatusCode::OK, body));
    }
    let mut body = crd::table_with(
        request.info,
        &page.items,
        &rv.to_string(),
        OffsetDateTime::now_utc(),
        table_options(query),
    );
    if let Some(token) = page.next {
        body["metadata"]["continue"] = json!(token);
    }
    if let Some(count) = page.remaining {
        body["metadata"]["remainingItemCount"] = json!(count);
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// What a list's storage step produced.
enum Listed {
    /// The whole answer, serialized (or why it could not be).
    Text(Result<String, serde_json::Error>),
    /// A selector could not be applied to an object.
    Refused(ApiError),
    /// The page of parsed objects, at its rv.
    Objects(u64, pagination::Page),
}

/// A list answer (`kind: XList`), its members in the order kube-apiserver's JSON has them.
#[derive(serde::Serialize)]
struct ListBody<'a, T> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    items: &'a [T],
    kind: &'a str,
    metadata: ListMeta,
}

#[derive(serde::Serialize)]
struct ListMeta {
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    #[serde(rename = "remainingItemCount", skip_serializing_if = "Option::is_none")]
    remaining: Option<usize>,
    #[serde(rename = "resourceVersion")]
    resource_version: String,
}

fn list_body<T: serde::Serialize>(
    api_version: &str,
    kind: &str,
    rv: u64,
    page: pagination::Page<T>,
) -> Result<String, serde_json::Error> {
    let body = ListBody {
        api_version,
        items: &page.items,
        kind,
        metadata: ListMeta {
            next: page.next,
            remaining: page.remaining,
            resource_version: rv.to_string(),
        },
    };
    serde_json::to_string(&body)
}

/// The list options about versions: `Some(rv)` when the list must be exactly at `rv`
/// (`resourceVersionMatch=Exact`). Every other list is served at the latest version, which
/// satisfies `NotOlderThan` and an unset match alike.
fn list_version(query: &Query) -> Result<Option<u64>, ApiError> {
    let rv = query_rv(query)?;
    let field = || "resourceVersionMatch".to_string();
    let continued = query.get("continue").is_some_and(|c| !c.is_empty());
    match query.get("resourceVersionMatch").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(_) if continued => Err(ApiError::invalid_list_options(vec![Cause {
            field: field(),
            message: "Forbidden: resourceVersionMatch is forbidden when continue is provided"
                .into(),
        }])),
        Some(_) if rv.is_none() => Err(ApiError::invalid_list_options(vec![Cause {
            field: field(),
            message:
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"
                    .into(),
        }])),
        Some("NotOlderThan") => Ok(None),
        Some("Exact") if rv == Some(0) => Err(ApiError::invalid_list_options(vec![Cause {
            field: field(),
            message:
                "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\""
                    .into(),
        }])),
        Some("Exact") => Ok(rv),
        Some(other) => Err(ApiError::invalid_list_options(vec![Cause {
            field: field(),
            message: format!(
                "Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\", \"\""
            ),
        }])),
    }
}

/// An exact list at `requested`: 504 when it is newer than the store (kube-apiserver's "Too
/// large resource version"), 410 Expired when the events after it were compacted away.
async fn check_exact(
    api: &Arc<Api>,
    id: &ResourceId,
    namespace: Option<&str>,
    requested: u64,
) -> Result<(), ApiError> {
    let current = api.store.resource_version();
    if requested > current {
        return Err(ApiError::too_large_resource_version(requested, current));
    }
    let (store, id, namespace) = (api.store.clone(), id.clone(), namespace.map(str::to_owned));
    // A watch from `requested` is refused exactly when its events are no longer kept.
    match blocking(move || store.watch(&id, namespace.as_deref(), requested)).await? {
        Err(StoreError::Gone { .. }) => Err(ApiError::gone(
            "The resourceVersion for the provided list is too old.",
        )),
        _ => Ok(()),
    }
}

pub(crate) async fn load(
    api: &Arc<Api>,
    info: &'static ResourceInfo,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let store = api.store.clone();
    let id = resource_id(info);
    let (ns, n) = (namespace.to_string(), name.to_string());
    blocking(move || store.get(&id, &ns, &n))
        .await?
        .map_err(|e| ApiError::from_store(e, info.group, info.plural, name))?
        .ok_or_else(|| ApiError::not_found(info.group, info.plural, name))
}

async fn get(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // Parsed only to refuse what is not a resourceVersion: any version is served the latest
    // object, which is never older than the one asked for.
    query_rv(query)?;
    let namespace = request.namespace.clone().unwrap_or_default();
    let mut object = load(api, request.info, &namespace, name).await?;
    crd::present(request.info, &mut object);
    if wants_table(headers) {
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let table = crd::table_with(
            request.info,
            &[object],
            &rv,
            OffsetDateTime::now_utc(),
            table_options(query),
        );
        return Ok(json_response(StatusCode::OK, &table));
    }
    Ok(json_response(StatusCode::OK, &object))
}

pub(crate) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// The resourceVersion a patch's write is conditional on, and whether a conflict is tried
/// again with the fresh object. The patched object carries the current version (`current`)
/// unless the patch itself names another: that one is the client's precondition, kept and
/// never retried (409 at once, as from kube-apiserver; a retry would meet the same stale
/// version). A patch naming the current version that meets a concurrent write is tried once
/// more, and then names another.
fn patch_precondition(patched: Option<u64>, current: Option<u64>) -> (Option<u64>, bool) {
    match patched {
        Some(named) if Some(named) != current => (Some(named), false),
        _ => (current, true),
    }
}

/// The `metadata.resourceVersion` a client sent: absent or empty means unconditional; any
/// other value that is not a resourceVersion is a 400 (never an unconditional write).
fn requested_rv(object: &Value) -> Result<Option<u64>, ApiError> {
    match &object["metadata"]["resourceVersion"] {
        Value::Null => Ok(None),
        Value::String(text) if text.is_empty() => Ok(None),
        Value::String(text) => parse_rv(text).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "metadata.resourceVersion: Invalid value: {text:?}: must be an unsigned decimal integer"
            ))
        }),
        other => Err(ApiError::bad_request(format!(
            "metadata.resourceVersion: Invalid value: {other}: must be a string"
        ))),
    }
}

async fn create(
    api: &Arc<Api>,
    request: &ResourceRequest,
    query: &Query,
    body: &[u8],
    manager: &str,
) -> Result<Response, ApiError> {
    let info = request.info;
    let mode = FieldValidation::from_query(&Method::POST, query)?;
    let mut object = parse_body(body)?;
    let findings = validation::body_findings(info, request.subresource.as_deref(), body);
    let warnings = validation::enforce(mode, &findings, &mut object, |f| {
        validation::body_error(info, f)
    })?;
    let stored = create_object(api, request, object, Ownership::Update(manager)).await?;
    Ok(validation::with_warnings(
        json_response(StatusCode::CREATED, &stored),
        &warnings,
    ))
}

/// Who owns the fields a write changes (`metadata.managedFields`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ownership<'a> {
    /// An `Update` (create, update, non-apply patch) by this field manager.
    Update(&'a str),
    /// A server-side apply, which computed the object's managedFields itself.
    Applied,
}

/// Creates `object` (the body of a create, or what an apply creates).
async fn create_object(
    api: &Arc<Api>,
    request: &ResourceRequest,
    mut object: Value,
    ownership: Ownership<'_>,
) -> Result<Value, ApiError> {
    let info = request.info;
    objects::check_type(info, &object)?;
    if info.namespaced {
        let Some(ns) = request.namespace.clone() else {
            return Err(ApiError::method_not_allowed(format!(
                "create {} in a namespace: POST /…/namespaces/NAMESPACE/{}",
                info.plural, info.plural
            )));
        };
        match object["metadata"]["namespace"].as_str() {
            Some(given) if !given.is_empty() && given != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => object["metadata"]["namespace"] = json!(ns),
        }
        let namespace = load(api, objects::namespace_info(), "", &ns)
            .await
            .map_err(|_| ApiError::not_found("", "namespaces", &ns))?;
        if namespace["metadata"]["deletionTimestamp"].is_string() {
            return Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            )));
        }
    }
    let requested_fields = object["metadata"]
        .get("managedFields")
        .cloned()
        .unwrap_or_default();
    let now = OffsetDateTime::now_utc();
    objects::prepare_create(info, &mut object, now)?;
    match ownership {
        Ownership::Update(manager) => apply::track_update(
            info,
            None,
            None,
            &mut object,
            &requested_fields,
            manager,
            now,
        ),
        Ownership::Applied => apply::set_managed_fields(&mut object, requested_fields),
    }
    let (namespace, name) = objects::key(&object);
    let writer = Writer::new(&api.store);
    let id = resource_id(info);
    let body_name = name.clone();
    let allocator = allocates(info, None).then(|| api.services.clone());
    let store = api.store.clone();
    let stored = blocking(move || {
        // A Service's addresses are chosen and written under one lock (dry runs too: they
        // answer with what would be allocated, and hold nothing once answered).
        let _guard = match &allocator {
            Some(allocator) => Some(allocator.allocate(&store, None, &mut object)?),
            None => None,
        };
        Ok::<_, ApiError>(writer.create(&id, &namespace, &name.clone(), object))
    })
    .await??
    .map_err(|e| {
        let name = match &e {
            StoreError::AlreadyExists => "",
            _ => "",
        };
        ApiError::from_store(e, info.group, info.plural, name)
    });
    match stored {
        Ok(s) => Ok(s),
        Err(mut e) => {
            if e.reason == "AlreadyExists" {
                e = ApiError::already_exists(info.group, info.plural, &body_name);
            }
            Err(e)
        }
    }
}

/// Writes `new` over `current` (same object), applying the rules for updates: immutable
/// metadata, status-subresource split, generation, and finalization.
pub(crate) async fn write_update(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    current: &Value,
    mut new: Value,
    expected: Option<u64>,
    ownership: Ownership<'_>,
) -> Result<Value, ApiError> {
    let info = request.info;
    objects::check_type(info, &new)?;
    let requested_fields = new["metadata"]["managedFields"].clone();
    objects::prepare_update(info, request.subresource.as_deref(), current, &mut new)?;
    match ownership {
        Ownership::Update(manager) => apply::track_update(
            info,
            request.subresource.as_deref(),
            Some(current),
            &mut new,
            &requested_fields,
            manager,
            OffsetDateTime::now_utc(),
        ),
        Ownership::Applied => apply::set_managed_fields(&mut new, requested_fields),
    }
    if matches!(ownership, Ownership::Applied) && new == *current {
        // An apply that changes nothing writes nothing (the resourceVersion stays).
        return Ok(new);
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let writer = Writer::new(&api.store);
    let id = resource_id(info);
    let n = name.to_string();
    let finalized = objects::is_finalized(current, &new);
    let result = if finalized {
        // Deletion was pending on finalizers and the last one is gone: remove the object.
        blocking(move || writer.delete(&id, &namespace, &n, expected)).await?
    } else if allocates(info, request.subresource.as_deref()) {
        let allocator = api.services.clone();
        let store = api.store.clone();
        let current = current.clone();
        blocking(move || {
            let mut new = new;
            let _guard = allocator.allocate(&store, Some(&current), &mut new)?;
            Ok::<_, ApiError>(writer.update(&id, &namespace, &n, new, expected))
        })
        .await??
    } else {
        blocking(move || writer.update(&id, &namespace, &n, new, expected)).await?
    };
    let written = result.map_err(|e| ApiError::from_store(e, info.group, info.plural, name))?;
    if finalized {
        spawn_garbage_collection(api, &written, objects::Propagation::Background);
    }
    Ok(written)
}

async fn update(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    query: &Query,
    body: &[u8],
    manager: &str,
) -> Result<Response, ApiError> {
    let mode = FieldValidation::from_query(&Method::PUT, query)?;
    let mut new = parse_body(body)?;
    let info = request.info;
    let findings = validation::body_findings(info, request.subresource.as_deref(), body);
    let warnings = validation::enforce(mode, &findings, &mut new, |f| {
        validation::body_error(info, f)
    })?;
    if let Some(given) = new["metadata"]["name"].as_str()
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let current = load(api, request.info, &namespace, name).await?;
    // With a resourceVersion in the body the update is conditional on it (409 on mismatch).
    let expected = requested_rv(&new)?;
    let written = write_update(
        api,
        request,
        name,
        &current,
        new,
        expected,
        Ownership::Update(manager),
    )
    .await?;
    Ok(validation::with_warnings(
        json_response(StatusCode::OK, &written),
        &warnings,
    ))
}

async fn patch_object(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
    manager: &str,
) -> Result<Response, ApiError> {
    let mode = FieldValidation::from_query(&Method::PATCH, query)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let patch_type = PatchType::from_content_type(content_type).ok_or_else(|| {
        ApiError::unsupported_media_type(format!(
            "the patch content type {content_type:?} is not supported"
        ))
    })?;
    let force = apply::patch_force(patch_type == PatchType::Apply, query)?;
    if patch_type == PatchType::Apply {
        return apply_patch(api, request, name, body, manager, force).await;
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    // Optimistic retry: a concurrent write between our read and our write is retried with the
    // fresh object, as the apiserver does for patches without a resourceVersion.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = load(api, request.info, &namespace, name).await?;
        let mut patched =
            patch::apply(patch_type, request.info.kind, &current, body).map_err(|e| match e {
                PatchError::Malformed(m) => ApiError::bad_request(m),
                PatchError::Failed(m) => ApiError::invalid(
                    request.info.kind,
                    name,
                    vec![Cause {
                        field: "patch".into(),
                        message: m,
                    }],
                ),
                PatchError::Unsupported(m) => ApiError::unsupported_media_type(m),
            })?;
        // Unknown fields of the patch show in its result (the stored object has none).
        let findings =
            validation::object_findings(request.info, request.subresource.as_deref(), &patched);
        if mode == FieldValidation::Strict && !findings.is_empty() {
            return Err(validation::patch_error(&patched, &findings));
        }
        let warnings = validation::enforce(mode, &findings, &mut patched, |f| {
            validation::patch_error(&Value::Null, f)
        })?;
        let (expected, retry) = patch_precondition(requested_rv(&patched)?, rv_of(&current));
        match write_update(
            api,
            request,
            name,
            &current,
            patched,
            expected,
            Ownership::Update(manager),
        )
        .await
        {
            Err(e) if e.reason == "Conflict" && retry && attempts < 5 => continue,
            Err(e) => return Err(e),
            Ok(written) => {
                return Ok(validation::with_warnings(
                    json_response(StatusCode::OK, &written),
                    &warnings,
                ));
            }
        }
    }
}

/// `PATCH` with `application/apply-patch+yaml`: server-side apply ([`apply`]), creating the
/// object when it does not exist; the result takes the same write path as any update.
async fn apply_patch(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    body: &[u8],
    manager: &str,
    force: bool,
) -> Result<Response, ApiError> {
    let info = request.info;
    let config = apply::parse_config(body)?;
    objects::check_type(info, &config)?;
    if let Some(given) = config["metadata"]["name"].as_str()
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let subresource = request.subresource.as_deref();
    // A resourceVersion in the configuration is a precondition (409 when stale, no retry).
    let requested = requested_rv(&config)?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = match load(api, info, &namespace, name).await {
            Ok(current) => Some(current),
            Err(e) if e.reason == "NotFound" && subresource.is_none() => None,
            Err(e) => return Err(e),
        };
        let now = OffsetDateTime::now_utc();
        let applied = apply::apply(
            info,
            subresource,
            current.as_ref(),
            &config,
            manager,
            force,
            now,
        )?;
        let written = match &current {
            None => {
                let mut object = applied;
                object["metadata"]["name"] = json!(name);
                create_object(api, request, object, Ownership::Applied)
                    .await
                    .map(|created| (StatusCode::CREATED, created))
            }
            Some(current) => {
                let expected = requested.or_else(|| rv_of(current));
                write_update(
                    api,
                    request,
                    name,
                    current,
                    applied,
                    expected,
                    Ownership::Applied,
                )
                .await
                .map(|updated| (StatusCode::OK, updated))
            }
        };
        match written {
            Err(e)
                if matches!(e.reason, "Conflict" | "AlreadyExists")
                    && requested.is_none()
                    && attempts < 5 => {}
            Err(e) => return Err(e),
            Ok((code, object)) => return Ok(json_response(code, &object)),
        }
    }
}

/// `POST pods/NAME/binding`: assigns an unbound pod to a node (what a scheduler does).
async fn bind(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    let binding = parse_body(body)?;
    let Some(node) = binding["target"]["name"].as_str().filter(|n| !n.is_empty()) else {
        return Err(ApiError::invalid(
            "Binding",
            name,
            vec![Cause {
                field: "target.name".into(),
                message: "Required value".into(),
            }],
        ));
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let current = load(api, request.info, &namespace, name).await?;
    if let Some(assigned) = current["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        return Err(ApiError::conflict(
            "",
            "pods",
            name,
            &format!("pod {name} is already assigned to node {assigned:?}"),
        ));
    }
    if let Some(uid) = binding["metadata"]["uid"].as_str()
        && current["metadata"]["uid"].as_str() != Some(uid)
    {
        return Err(ApiError::conflict(
            "",
            "pods",
            name,
            "the pod's uid does not match the binding",
        ));
    }
    let mut bound = current.clone();
    bound["spec"]["nodeName"] = json!(node);
    objects::set_condition(
        &mut bound,
        "PodScheduled",
        "True",
        "",
        "",
        OffsetDateTime::now_utc(),
    );
    let expected = rv_of(&current);
    api_update_raw(api, request.info, &namespace, name, bound, expected).await?;
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
    Ok(json_response(StatusCode::CREATED, &status))
}

#[derive(Debug, Default)]
pub(crate) struct DeleteOptions {
    grace_period: Option<i64>,
    propagation: Option<String>,
    uid: Option<String>,
    resource_version: Option<u64>,
}

pub(crate) fn delete_options(query: &Query, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let mut opts = DeleteOptions::default();
    // The deprecated `orphanDependents`: true is `Orphan`, false `Background`; it may not be
    // combined with `propagationPolicy` (kube-apiserver's `ValidateDeleteOptions`).
    let mut orphan_dependents = None;
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions is not valid JSON: {e}")))?;
        opts.grace_period = v["gracePeriodSeconds"].as_i64();
        opts.propagation = v["propagationPolicy"].as_str().map(String::from);
        orphan_dependents = v["orphanDependents"].as_bool();
        opts.uid = v["preconditions"]["uid"].as_str().map(String::from);
        opts.resource_version = match &v["preconditions"]["resourceVersion"] {
            Value::String(text) if !text.is_empty() => Some(parse_rv(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "preconditions.resourceVersion: Invalid value: {text:?}: must be an unsigned decimal integer"
                ))
            })?),
            _ => None,
        };
    }
    if let Some(g) = query.get("gracePeriodSeconds") {
        opts.grace_period = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request("gracePeriodSeconds must be an integer"))?,
        );
    }
    if let Some(p) = query.get("propagationPolicy") {
        opts.propagation = Some(p.clone());
    }
    if let Some(o) = query.get("orphanDependents") {
        orphan_dependents = Some(o == "true" || o == "1");
    }
    let invalid = |message: String| {
        dryrun::invalid_options(
            &Method::DELETE,
            vec![Cause {
                field: "propagationPolicy".into(),
                message,
            }],
        )
    };
    match (orphan_dependents, opts.propagation.as_deref()) {
        (Some(_), Some(policy)) => {
            return Err(invalid(format!(
                "Invalid value: {policy:?}: orphanDependents and deletionPropagation cannot be both set"
            )));
        }
        (Some(true), None) => opts.propagation = Some("Orphan".into()),
        (Some(false), None) => opts.propagation = Some("Background".into()),
        _ => {}
    }
    match opts.propagation.as_deref() {
        None | Some("Orphan" | "Background" | "Foreground") => Ok(opts),
        Some(other) => Err(invalid(format!(
            "Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
        ))),
    }
}

async fn delete(
    api: &Arc<Api>,
    request: &ResourceRequest,
    name: &str,
    query: &Query,
    body: &[u8],
) -> Result<Response, ApiError> {
    let info = request.info;
    objects::check_deletable(info, name)?;
    let opts = delete_options(query, body)?;
    let namespace = request.namespace.clone().unwrap_or_default();
    let current = load(api, info, &namespace, name).await?;
    if let Some(uid) = &opts.uid
        && current["metadata"]["uid"].as_str() != Some(uid)
    {
        return Err(ApiError::conflict(
            info.group,
            info.plural,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                current["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        ));
    }
    if let Some(rv) = opts.resource_version
        && rv_of(&current) != Some(rv)
    {
        return Err(ApiError::conflict(
            info.group,
            info.plural,
            name,
            "Precondition failed: resourceVersion does not match",
        ));
    }
    let now = OffsetDateTime::now_utc();
    // Without a policy: the one an earlier delete chose (its finalizer), else the kind's.
    let mut warnings = Vec::new();
    let propagation = match opts.propagation.as_deref() {
        Some(policy) => Some(policy),
        None if has_gc_finalizer(&current) => None,
        None => {
            let policy = gc::default_propagation(info);
            if policy == "Orphan" {
                warnings.push(gc::JOB_ORPHAN_WARNING.to_string());
            }
            Some(policy)
        }
    };
    if let Some(pending) =
        objects::pending_deletion(info, &current, opts.grace_period, propagation, now)
    {
        // Finalizers or a graceful pod deletion: mark it and keep the object.
        let expected = rv_of(&current);
        let written = api_update_raw(api, info, &namespace, name, pending, expected).await?;
        if info.plural == "namespaces" {
            spawn_namespace_cleanup(api, name);
        }
        if has_gc_finalizer(&written) && !DryRun::current().is_dry() {
            gc::wake();
        }
        return Ok(validation::with_warnings(
            json_response(StatusCode::OK, &written),
            &warnings,
        ));
    }
    let writer = Writer::new(&api.store);
    let id = resource_id(info);
    let (ns, n) = (namespace.clone(), name.to_string());
    let expected = rv_of(&current);
    let deleted = blocking(move || writer.delete(&id, &ns, &n, expected))
        .await?
        .map_err(|e| ApiError::from_store(e, info.group, info.plural, name))?;
    let propagation = if opts.propagation.as_deref() == Some("Orphan") {
        objects::Propagation::Orphan
    } else {
        objects::Propagation::Background
    };
    spawn_garbage_collection(api, &deleted, propagation);
    Ok(json_response(StatusCode::OK, &deleted))
}

/// Whether the garbage collector's `orphan` or `foregroundDeletion` finalizer is set.
fn has_gc_finalizer(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|list| {
            list.iter()
                .any(|f| f == objects::ORPHAN_FINALIZER || f == objects::FOREGROUND_FINALIZER)
        })
}

/// Writes an object prepared by this module (no update rules applied).
async fn api_update_raw(
    api: &Arc<Api>,
    info: &'static ResourceInfo,
    namespace: &str,
    name: &str,
    object: Value,
    expected: Option<u64>,
) -> Result<Value, ApiError> {
    let writer = Writer::new(&api.store);
    let id = resource_id(info);
    let (ns, n) = (namespace.to_string(), name.to_string());
    blocking(move || writer.update(&id, &ns, &n, object, expected))
        .await?
        .map_err(|e| ApiError::from_store(e, info.group, info.plural, name))
}

async fn delete_collection(
    api: &Arc<Api>,
    request: &ResourceRequest,
    query: &Query,
) -> Result<Response, ApiError> {
    if !request.info.verbs.contains(&"deletecollection") {
        return Err(ApiError::method_not_allowed(format!(
            "deletecollection is not supported on {}",
            request.info.plural
        )));
    }
    let (labels, fields) = selectors(query)?;
    let store = api.store.clone();
    let id = resource_id(request.info);
    let namespace = request.namespace.clone();
    let (objects, rv) = blocking(move || store.list(&id, namespace.as_deref()))
        .await?
        .map_err(|e| ApiError::from_store(e, request.info.group, request.info.plural, ""))?;
    let mut deleted = Vec::new();
    for object in objects {
        if !matches(request.info, &labels, &fields, &object)? {
            continue;
        }
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let one = ResourceRequest {
            namespace: object["metadata"]["namespace"]
                .as_str()
                .map(String::from)
                .filter(|s| !s.is_empty()),
            name: Some(name.clone()),
            ..request.clone()
        };
        match Box::pin(delete(api, &one, &name, query, &[])).await {
            Ok(_) => deleted.push(object),
            Err(e) if e.reason == "NotFound" => {}
            Err(e) => return Err(e),
        }
    }
    let body = json!({
        "kind": format!("{}List", request.info.kind),
        "apiVersion": request.info.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// Handles the dependents of a deleted owner in the background: `Background` deletes those
/// whose owners are all gone, `Orphan` only removes the owner reference.
fn spawn_garbage_collection(api: &Arc<Api>, deleted: &Value, propagation: objects::Propagation) {
    if DryRun::current().is_dry() {
        return;
    }
    let Some(uid) = deleted["metadata"]["uid"].as_str().map(String::from) else {
        return;
    };
    let store = api.store.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = objects::collect_garbage(&store, &uid, propagation) {
            tracing::warn!(owner.uid = %uid, ?propagation, error = %e, "garbage collection failed");
        }
    });
}

/// Deletes everything in a terminating namespace, then the namespace itself.
fn spawn_namespace_cleanup(api: &Arc<Api>, namespace: &str) {
    if DryRun::current().is_dry() {
        return;
    }
    let store = api.store.clone();
    let namespace = namespace.to_string();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = objects::empty_namespace(&store, &namespace) {
            tracing::warn!(namespace = %namespace, error = %e, "namespace cleanup failed");
        }
    });
}

/// One line of a watch: `{"object":…,"type":…}`, the members in the order of kube-apiserver's
/// JSON.
#[derive(serde::Serialize)]
struct WatchLine<'a, T: ?Sized> {
    object: &'a T,
    #[serde(rename = "type")]
    event_type: &'a str,
}

fn watch_line<T: serde::Serialize + ?Sized>(event_type: &str, object: &T) -> Bytes {
    let line = WatchLine { object, event_type };
    let mut text = match serde_json::to_string(&line) {
        Ok(text) => text,
        // Not reachable for JSON values and text; if it were, the watcher gets an ERROR
        // event saying so instead of a line that is not JSON.
        Err(e) => {
            let status = ApiError::internal(format!("cannot write a watch event: {e}")).to_status();
            json!({"type": "ERROR", "object": status}).to_string()
        }
    };
    text.push('\n');
    Bytes::from(text)
}

async fn watch_collection(
    api: &Arc<Api>,
    request: &ResourceRequest,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let info = request.info;
    let (labels, fields) = selectors(query)?;
    check_fields(info, &fields)?;
    let table = wants_table(headers);
    let options = table_options(query);
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(30 * 60));
    let requested: Option<u64> = query_rv(query)?.filter(|rv| *rv != 0);
    // A streaming list (`sendInitialEvents=true`, kube-rs `streaming_lists()`, client-go
    // WatchList): the current state as ADDED events whatever the resourceVersion (ours is
    // always at least as new), then a bookmark marking their end.
    let send_initial = matches!(
        query.get("sendInitialEvents").map(String::as_str),
        Some("true" | "1")
    );
    let store = api.store.clone();
    let id = resource_id(info);
    let namespace = request.namespace.clone();
    // Without a resourceVersion, a watch starts with the current state as ADDED events.
    let (initial, from) = match requested {
        Some(rv) if !send_initial => (Vec::new(), rv),
        _ => {
            let (store2, id2, ns2) = (store.clone(), id.clone(), namespace.clone());
            let (objects, rv) = blocking(move || store2.list(&id2, ns2.as_deref()))
                .await?
                .map_err(|e| ApiError::from_store(e, info.group, info.plural, ""))?;
            (objects, rv)
        }
    };
    let (store2, id2, ns2) = (store.clone(), id.clone(), namespace.clone());
    let watch = blocking(move || store2.watch(&id2, ns2.as_deref(), from)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    // An event's object goes out as stored unless it is a custom resource to present or a
    // Table row; then every watcher renders its own.
    let as_stored = !table && !crd::presents(info);
    let render = move |object: &Value| -> Value {
        let mut object = object.clone();
        crd::present(info, &mut object);
        if table {
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            crd::table_with(
                info,
                std::slice::from_ref(&object),
                &rv,
                OffsetDateTime::now_utc(),
                options,
            )
        } else {
            object
        }
    };
    let mut watch = match watch {
        Ok(w) => w,
        Err(StoreError::Gone { requested, oldest }) => {
            // The apiserver answers 200 and an ERROR event carrying a 410 Status.
            let status =
                ApiError::gone(format!("too old resource version: {requested} ({oldest})"))
                    .to_status();
            return Ok(streaming(vec![watch_line("ERROR", &status)], None));
        }
        Err(e) => return Err(ApiError::from_store(e, info.group, info.plural, "")),
    };
    let mut first = Vec::new();
    for object in &initial {
        if matches(info, &labels, &fields, object)? {
            first.push(watch_line("ADDED", &render(object)));
        }
    }
    let bookmark_interval = api.bookmark_interval;
    let api_version = info.api_version();
    let kind = info.kind;
    if send_initial {
        let end = json!({"kind": kind, "apiVersion": api_version, "metadata": {
            "resourceVersion": from.to_string(),
            "annotations": {"k8s.io/initial-events-end": "true"},
        }});
        first.push(watch_line("BOOKMARK", &end));
    }
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(bookmark_interval);
        tick.tick().await;
        let mut last_rv = from;
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = tx.closed() => break,
                _ = tick.tick(), if bookmarks => {
                    // Every event up to this rv was delivered or filtered out: safe to resume from.
                    let rv = watch.resource_version().max(last_rv);
                    let bookmark = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(watch_line("BOOKMARK", &bookmark)).await.is_err() {
                        break;
                    }
                }
                event = watch.next() => {
                    let Some(event) = event else { break };
                    last_rv = event.rv;
                    if let Some(line) = event_line(&event, info, &labels, &fields, as_stored, &render) && tx.send(line).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(streaming(first, Some(rx)))
}

/// The line a filtered watch sends for `event`, if any. An object that starts matching the
/// selectors is `ADDED` and one that stops matching is `DELETED`, as the apiserver's watch
/// cache does, so a selector-scoped cache never keeps an object that left its scope.
fn event_line(
    event: &WatchEvent,
    info: &ResourceInfo,
    labels: &Option<LabelSelector>,
    fields: &Option<FieldSelector>,
    as_stored: bool,
    render: &impl Fn(&Value) -> Value,
) -> Option<Bytes> {
    let object = event.object.as_ref();
    let now = matches(info, labels, fields, object).unwrap_or(false);
    let kind = match event.event_type {
        EventType::Added if now => "ADDED",
        EventType::Deleted if now => "DELETED",
        EventType::Modified => {
            let before = event
                .previous
                .as_deref()
                .is_none_or(|previous| matches(info, labels, fields, previous).unwrap_or(false));
            match (before, now) {
                (true, true) => "MODIFIED",
                (false, true) => "ADDED",
                (true, false) => "DELETED",
                (false, false) => return None,
            }
        }
        _ => return None,
    };
    if as_stored && let Ok(json) = event.object_json() {
        return Some(watch_line(kind, json));
    }
    Some(watch_line(kind, &render(object)))
}

fn streaming(first: Vec<Bytes>, rest: Option<tokio::sync::mpsc::Receiver<Bytes>>) -> Response {
    let head = futures::stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>));
    let body = match rest {
        Some(rx) => {
            let tail = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok(b), rx))
            });
            Body::from_stream(futures::StreamExt::chain(head, tail))
        }
        None => Body::from_stream(head),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(body)
        .unwrap_or_else(|_| ApiError::internal("cannot build the watch response").into_response())
}

#[cfg(test)]
mod tests {
    use super::super::store::ResourceId;
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Query {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn resource_versions_are_decimal_digits_only() {
        assert_eq!(parse_rv("42"), Some(42));
        for bad in [
            "",
            "abc",
            "-1",
            "+1",
            " 1",
            "1e3",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_rv(bad), None, "{bad:?}");
        }
        let e = query_rv(&query(&[("resourceVersion", "abc")])).expect_err("abc");
        assert_eq!((e.code.as_u16(), e.reason), (400, "BadRequest"));
        assert_eq!(query_rv(&query(&[("resourceVersion", "")])), Ok(None));
        let e = requested_rv(&json!({"metadata": {"resourceVersion": "abc"}})).expect_err("abc");
        assert_eq!((e.code.as_u16(), e.reason), (400, "BadRequest"));
        assert!(
            e.message.contains("metadata.resourceVersion"),
            "{}",
            e.message
        );
        assert_eq!(requested_rv(&json!({"metadata": {}})), Ok(None));
    }

    #[test]
    fn a_patch_naming_a_stale_version_conflicts_at_once_and_one_naming_none_is_retried() {
        // No version named: the patched object carries the current one; retried on conflict.
        assert_eq!(patch_precondition(Some(7), Some(7)), (Some(7), true));
        assert_eq!(patch_precondition(None, Some(7)), (Some(7), true));
        // A stale version named: conditional on it, no retry.
        assert_eq!(patch_precondition(Some(5), Some(7)), (Some(5), false));
    }

    #[test]
    fn resource_version_match_follows_the_list_options_rules() {
        let status = |pairs: &[(&str, &str)]| {
            list_version(&query(pairs))
                .map_err(|e| (e.code.as_u16(), e.reason, e.causes()[0].message.clone()))
        };
        assert_eq!(
            status(&[("resourceVersionMatch", "Exact"), ("resourceVersion", "7")]),
            Ok(Some(7))
        );
        assert_eq!(
            status(&[
                ("resourceVersionMatch", "NotOlderThan"),
                ("resourceVersion", "7")
            ]),
            Ok(None)
        );
        assert_eq!(status(&[("resourceVersion", "7")]), Ok(None));
        let (code, reason, message) =
            status(&[("resourceVersionMatch", "Exact")]).expect_err("no rv");
        assert_eq!((code, reason), (422, "Invalid"));
        assert!(
            message.contains("forbidden unless resourceVersion is provided"),
            "{message}"
        );
        let (code, _, message) =
            status(&[("resourceVersionMatch", "Bogus"), ("resourceVersion", "1")])
                .expect_err("bogus");
        assert_eq!(code, 422);
        assert!(
            message.starts_with("Unsupported value: \"Bogus\""),
            "{message}"
        );
    }

    #[test]
    fn delete_options_are_validated_as_kube_apiserver_does() {
        let opts = |q: &[(&str, &str)], body: &str| delete_options(&query(q), body.as_bytes());
        assert_eq!(
            opts(&[], r#"{"orphanDependents":true}"#)
                .expect("orphan")
                .propagation
                .as_deref(),
            Some("Orphan")
        );
        assert_eq!(
            opts(&[], r#"{"orphanDependents":false}"#)
                .expect("background")
                .propagation
                .as_deref(),
            Some("Background")
        );
        let both = opts(
            &[],
            r#"{"orphanDependents":true,"propagationPolicy":"Foreground"}"#,
        )
        .expect_err("both");
        assert_eq!(
            both.message,
            "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Invalid value: \"Foreground\": orphanDependents and deletionPropagation cannot be both set"
        );
        let bogus = opts(&[("propagationPolicy", "Bogus")], "").expect_err("bogus");
        assert_eq!((bogus.code.as_u16(), bogus.reason), (422, "Invalid"));
        assert_eq!(
            bogus.message,
            "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"Bogus\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
        );
    }

    #[test]
    fn query_pairs_are_decoded() {
        let uri: Uri = "/api/v1/pods?labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"
            .parse()
            .expect("uri");
        let q = query_of(&uri).expect("query");
        assert_eq!(
            q.get("labelSelector").map(String::as_str),
            Some("app=web,tier in (a)")
        );
        assert_eq!(q.get("watch").map(String::as_str), Some("1"));
    }

    #[test]
    fn objects_entering_or_leaving_a_selector_are_added_or_deleted() {
        let info = super::super::resources::lookup("", "v1", "pods").expect("pods");
        let labels = Some(LabelSelector::parse("app=web").expect("selector"));
        let pod = |app: &str| json!({"metadata": {"name": "p", "labels": {"app": app}}});
        let event = |previous: Option<Value>, object: Value| WatchEvent {
            rv: 2,
            event_type: EventType::Modified,
            resource: ResourceId {
                group: String::new(),
                resource: "pods".into(),
            },
            namespace: "default".into(),
            name: "p".into(),
            object: Arc::new(object),
            previous: previous.map(Arc::new),
            encoded: Default::default(),
        };
        let kind = |e: &WatchEvent| {
            event_line(e, info, &labels, &None, false, &|v: &Value| v.clone())
                .map(|b| serde_json::from_slice::<Value>(&b).expect("json")["type"].clone())
        };
        assert_eq!(
            kind(&event(Some(pod("db")), pod("web"))),
            Some(json!("ADDED"))
        );
        assert_eq!(
            kind(&event(Some(pod("web")), pod("db"))),
            Some(json!("DELETED"))
        );
        assert_eq!(
            kind(&event(Some(pod("web")), pod("web"))),
            Some(json!("MODIFIED"))
        );
        assert_eq!(kind(&event(Some(pod("db")), pod("db"))), None);
    }

    #[test]
    fn table_is_wanted_only_when_first_choice() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
                .parse()
                .expect("header"),
        );
        assert!(wants_table(&h));
        h.insert(header::ACCEPT, "application/json".parse().expect("header"));
        assert!(!wants_table(&h));
    }
}
