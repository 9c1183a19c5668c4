//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward` of the embedded API: the
//! request is checked as kube-apiserver checks it (its query options, the pod, the container,
//! the node), the stream to the edge is opened through [`crate::streams::Streams`] before
//! anything is answered (so a failure is a plain HTTP status with a `Status` body that kubectl
//! prints), and then the log is streamed as the response body, or the connection is upgraded
//! and handed to the [`streaming`] crate ([docs/streams.md](../../../docs/streams.md),
//! "Embedded API").
//!
//! These requests need the whole HTTP request (the upgrade rides in its extensions), so
//! [`super::verbs::handle`] hands them here after authentication and before it reads a body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use proto::stream::{
    AttachRequest, ExecRequest, LogsRequest, PodTarget, PortForwardRequest, StreamRequest,
};
use serde_json::Value;
use streaming::{Dial, RcOptions, Rejection};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::objects::resource_id;
use super::resources;
use super::status::{ApiError, Cause};
use super::verbs::Api;
use crate::streams::{OpenError, TunnelStream};

/// How long opening a tunnel stream may take before the request fails with a 504. The tunnel
/// fails within a second for a disconnected node; this only bounds an edge that accepted the
/// stream but never answers its header.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest piece of a log read from the tunnel at once (one chunk of the response body).
const LOG_CHUNK: usize = 32 * 1024;

/// The streaming subresources of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSubresource {
    Log,
    Exec,
    Attach,
    PortForward,
}

impl PodSubresource {
    /// `log`, `exec`, `attach`, `portforward`; anything else is not one.
    pub fn parse(name: &str) -> Option<PodSubresource> {
        match name {
            "log" => Some(PodSubresource::Log),
            "exec" => Some(PodSubresource::Exec),
            "attach" => Some(PodSubresource::Attach),
            "portforward" => Some(PodSubresource::PortForward),
            _ => None,
        }
    }
}

/// `GET|POST /api/v1/namespaces/{namespace}/pods/{name}/{log|exec|attach|portforward}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStreamRequest {
    pub namespace: String,
    pub name: String,
    pub subresource: PodSubresource,
}

/// Serves one pod stream request of an authenticated, authorized user.
pub async fn handle(api: Arc<Api>, target: PodStreamRequest, request: Request) -> Response {
    match serve(&api, &target, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    api: &Arc<Api>,
    target: &PodStreamRequest,
    request: Request,
) -> Result<Response, ApiError> {
    let params = Params::parse(request.uri())?;
    let method = request.method().clone();
    log_request(target, &method, request.headers());
    let allowed = match target.subresource {
        PodSubresource::Log => method == Method::GET,
        _ => method == Method::GET || method == Method::POST,
    };
    if !allowed {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on pods/{}",
            subresource_name(target.subresource)
        )));
    }
    match target.subresource {
        PodSubresource::Log => logs(api, target, &params).await,
        PodSubresource::Exec | PodSubresource::Attach => {
            remote_command(api, target, &params, request).await
        }
        PodSubresource::PortForward => port_forward(api, target, &params, request).await,
    }
}

/// One debug line per request with what the client asked to upgrade to (which transport and
/// protocol versions each kubectl offers).
fn log_request(target: &PodStreamRequest, method: &Method, headers: &axum::http::HeaderMap) {
    let header = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ")
    };
    tracing::debug!(
        pod.namespace = %target.namespace,
        pod.name = %target.name,
        subresource = subresource_name(target.subresource),
        %method,
        upgrade = %header("upgrade"),
        stream_protocols = %header("x-stream-protocol-version"),
        websocket_protocols = %header("sec-websocket-protocol"),
        "pod stream request"
    );
}

fn subresource_name(sub: PodSubresource) -> &'static str {
    match sub {
        PodSubresource::Log => "log",
        PodSubresource::Exec => "exec",
        PodSubresource::Attach => "attach",
        PodSubresource::PortForward => "portforward",
    }
}

// ---------------------------------------------------------------------------------------------
// Query options
// ---------------------------------------------------------------------------------------------

/// The query string as pairs in order, keys repeated (`command=sh&command=-c`): the options
/// structs of these subresources take lists, which a map would lose.
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(uri: &Uri) -> Result<Params, ApiError> {
        let Some(query) = uri.query() else {
            return Ok(Params::default());
        };
        serde_urlencoded::from_str(query)
            .map(Params)
            .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))
    }

    /// The first value of `key`, as the apiserver's query conversion takes it.
    fn first(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A boolean option as the apiserver converts query booleans: absent, `0` or `false` (any
    /// case) is false, anything else true, the empty string included (`?stdin`).
    fn flag(&self, key: &str) -> bool {
        self.first(key)
            .is_some_and(|v| !(v == "0" || v.eq_ignore_ascii_case("false")))
    }

    /// An integer option; a value that is not one is a 400 naming the option.
    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.first(key) {
            None => Ok(None),
            Some(text) => text.parse::<i64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!("{key}: invalid value {text:?}: not an integer"))
            }),
        }
    }
}

/// `PodLogOptions` from the query, checked as kube-apiserver's `ValidatePodLogOptions` does
/// (422 naming each bad field). The pod in the result is left empty.
fn log_options(params: &Params, pod_name: &str) -> Result<LogsRequest, ApiError> {
    let tail_lines = params.int("tailLines")?;
    let limit_bytes = params.int("limitBytes")?;
    let since_seconds = params.int("sinceSeconds")?;
    let since_time = match params.first("sinceTime") {
        None => None,
        Some(text) => Some(
            resources::parse_timestamp(text)
                .map(resources::format_timestamp)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "sinceTime: invalid value {text:?}: not an RFC 3339 time"
                    ))
                })?,
        ),
    };
    let mut causes = Vec::new();
    if let Some(n) = tail_lines.filter(|n| *n < 0) {
        causes.push(Cause {
            field: "tailLines".into(),
            message: format!("Invalid value: {n}: must be greater than or equal to 0"),
        });
    }
    if let Some(n) = limit_bytes.filter(|n| *n < 1) {
        causes.push(Cause {
            field: "limitBytes".into(),
            message: format!("Invalid value: {n}: must be greater than 0"),
        });
    }
    match (since_seconds, &since_time) {
        (Some(_), Some(_)) => causes.push(Cause {
            field: String::new(),
            message: "Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified"
                .into(),
        }),
        (Some(n), None) if n < 1 => causes.push(Cause {
            field: "sinceSeconds".into(),
            message: format!("Invalid value: {n}: must be greater than 0"),
        }),
        _ => {}
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid("PodLogOptions", pod_name, causes));
    }
    // Every number is non-negative here.
    let unsigned = |n: Option<i64>| n.map(|n| n.max(0) as u64);
    Ok(LogsRequest {
        pod: PodTarget::default(),
        container: params.first("container").unwrap_or_default().to_string(),
        follow: params.flag("follow"),
        previous: params.flag("previous"),
        timestamps: params.flag("timestamps"),
        tail_lines: unsigned(tail_lines),
        since_seconds: unsigned(since_seconds),
        since_time,
        limit_bytes: unsigned(limit_bytes),
    })
}

/// Which channels a remote command asks for, checked as kube-apiserver does: at least one of
/// stdin, stdout and stderr; with a tty, stderr is merged into stdout and not asked for.
fn rc_options(params: &Params) -> Result<RcOptions, ApiError> {
    let tty = params.flag("tty");
    let options = RcOptions {
        stdin: params.flag("stdin"),
        stdout: params.flag("stdout"),
        stderr: params.flag("stderr") && !tty,
        tty,
    };
    if !(options.stdin || options.stdout || params.flag("stderr")) {
        return Err(ApiError::bad_request(
            "you must specify at least 1 of stdin, stdout, stderr",
        ));
    }
    Ok(options)
}

/// The ports of a port-forward query (`ports=80&ports=8080` or `ports=80,8080`).
fn ports(params: &Params) -> Result<Vec<u16>, ApiError> {
    let mut ports = Vec::new();
    for value in params.all("ports") {
        for text in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match text.parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid port {text:?}: must be a number from 1 to 65535"
                    )));
                }
            }
        }
    }
    Ok(ports)
}

// ---------------------------------------------------------------------------------------------
// The pod
// ---------------------------------------------------------------------------------------------

/// A pod to stream from: the node it is bound to and what pins it on the edge.
#[derive(Debug, Clone)]
struct BoundPod {
    node: String,
    target: PodTarget,
    object: Value,
}

/// Loads the pod from the store: 404 when it does not exist, 400 when it is not bound to a node
/// yet (kube-apiserver's "does not have a host assigned").
async fn bound_pod(api: &Arc<Api>, namespace: &str, name: &str) -> Result<BoundPod, ApiError> {
    let info = resources::lookup("", "v1", "pods").expect("pods are in the resource table");
    let store = api.store.clone();
    let id = resource_id(info);
    let (ns, n) = (namespace.to_string(), name.to_string());
    let object = tokio::task::spawn_blocking(move || store.get(&id, &ns, &n))
        .await
        .map_err(|e| ApiError::internal(format!("storage task failed: {e}")))?
        .map_err(|e| ApiError::from_store(e, "", "pods", name))?
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let node = object["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if node.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    Ok(BoundPod {
        node,
        target: PodTarget {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: object["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        },
        object,
    })
}

fn container_names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The container a request is about, as kube-apiserver picks it: the one asked for if the pod
/// has it (containers, init or ephemeral containers), else the only container; with several
/// and none asked for, a 400 listing them.
fn choose_container(pod: &Value, name: &str, requested: &str) -> Result<String, ApiError> {
    let containers = container_names(pod, "containers");
    if requested.is_empty() {
        return match containers.as_slice() {
            [only] => Ok(only.clone()),
            [] => Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}"
            ))),
            many => {
                let mut message = format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    many.join(" ")
                );
                let init = container_names(pod, "initContainers");
                if !init.is_empty() {
                    message.push_str(&format!(
                        " or one of the init containers: [{}]",
                        init.join(" ")
                    ));
                }
                Err(ApiError::bad_request(message))
            }
        };
    }
    let known = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .any(|field| container_names(pod, field).iter().any(|c| c == requested));
    if known {
        Ok(requested.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "container {requested} is not valid for pod {name}"
        )))
    }
}

/// An [`OpenError`] as the `Status` kubectl prints: its HTTP status and its message.
fn open_error(e: OpenError) -> ApiError {
    ApiError::from_code(e.http_status(), e.to_string())
}

fn rejection(r: Rejection) -> ApiError {
    ApiError::from_code(r.code, r.message)
}

/// Opens `request` on `node`'s connection, bounded by [`OPEN_TIMEOUT`].
async fn open(
    api: &Arc<Api>,
    node: &str,
    request: StreamRequest,
) -> Result<TunnelStream, ApiError> {
    match tokio::time::timeout(OPEN_TIMEOUT, api.streams.open(node, request)).await {
        Ok(result) => result.map_err(open_error),
        Err(_) => Err(ApiError::from_code(
            504,
            format!(
                "node {node} did not answer the stream request within {}s",
                OPEN_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A `101 Switching Protocols` (or any) response of the streaming crate as an axum response.
fn upgraded(response: axum::http::Response<Bytes>) -> Response {
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::from(body))
}

// ---------------------------------------------------------------------------------------------
// The subresources
// ---------------------------------------------------------------------------------------------

/// `pods/log`: the edge's log bytes as a chunked `text/plain` body. Each chunk is read from
/// the tunnel only when hyper polls for the next one, so a client that stops reading stops the
/// reads from the tunnel, and QUIC's flow control stops the edge.
async fn logs(
    api: &Arc<Api>,
    target: &PodStreamRequest,
    params: &Params,
) -> Result<Response, ApiError> {
    let mut options = log_options(params, &target.name)?;
    let pod = bound_pod(api, &target.namespace, &target.name).await?;
    options.container = choose_container(&pod.object, &target.name, &options.container)?;
    options.pod = pod.target;
    let stream = open(api, &pod.node, StreamRequest::Logs(options)).await?;
    let (mut send, recv) = stream.into_io();
    // Nothing flows from the cloud on a logs stream.
    let _ = send.finish();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(log_body(recv))
        .map_err(|e| ApiError::internal(format!("cannot build the log response: {e}")))
}

/// A response body that reads the next chunk (up to [`LOG_CHUNK`]) from `reader` only when it
/// is polled for one, and ends at the reader's end of file.
fn log_body<R: AsyncRead + Send + Unpin + 'static>(reader: R) -> Body {
    let chunks = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut chunk = vec![0u8; LOG_CHUNK];
        match reader.read(&mut chunk).await {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some((Ok(Bytes::from(chunk)), Some(reader)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Body::from_stream(chunks)
}

/// `pods/exec` and `pods/attach`: checked, the tunnel opened, then the upgrade.
async fn remote_command(
    api: &Arc<Api>,
    target: &PodStreamRequest,
    params: &Params,
    mut request: Request,
) -> Result<Response, ApiError> {
    let exec = target.subresource == PodSubresource::Exec;
    let command = params.all("command");
    if exec && command.is_empty() {
        return Err(ApiError::bad_request(
            "you must specify at least one command for the container",
        ));
    }
    let options = rc_options(params)?;
    let pod = bound_pod(api, &target.namespace, &target.name).await?;
    let container = choose_container(
        &pod.object,
        &target.name,
        params.first("container").unwrap_or_default(),
    )?;
    if !streaming::is_upgrade(&request) {
        return Err(ApiError::bad_request(
            "Upgrade request required (SPDY/3.1 or websocket)",
        ));
    }
    let stream_request = if exec {
        StreamRequest::Exec(ExecRequest {
            pod: pod.target,
            container,
            command,
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
            tty: options.tty,
        })
    } else {
        StreamRequest::Attach(AttachRequest {
            pod: pod.target,
            container,
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
            tty: options.tty,
        })
    };
    let tunnel = open(api, &pod.node, stream_request).await?.into_boxed();
    streaming::remotecommand(&mut request, options, tunnel)
        .map(upgraded)
        .map_err(rejection)
}

/// `pods/portforward`: the pod checked, its node's live session checked before the upgrade (no IO)
/// (kube-apiserver fails the same way when it cannot dial the kubelet), then each forwarded
/// connection opens its own tunnel stream.
async fn port_forward(
    api: &Arc<Api>,
    target: &PodStreamRequest,
    params: &Params,
    mut request: Request,
) -> Result<Response, ApiError> {
    let ports = ports(params)?;
    let pod = bound_pod(api, &target.namespace, &target.name).await?;
    if !streaming::is_upgrade(&request) {
        return Err(ApiError::bad_request(
            "Upgrade request required (SPDY/3.1 or websocket)",
        ));
    }
    // The ports of a SPDY session arrive only with its streams: before the upgrade, only the
    // node's session can be checked.
    api.streams.check_live(&pod.node).map_err(open_error)?;
    let streams = api.streams.clone();
    let node = pod.node.clone();
    let pod_target = pod.target.clone();
    let dial: Dial = Arc::new(move |port| {
        let (streams, node, pod) = (streams.clone(), node.clone(), pod_target.clone());
        Box::pin(async move {
            let (name, uid) = (pod.name.clone(), pod.uid.clone());
            let opened = tokio::time::timeout(
                OPEN_TIMEOUT,
                streams.open(
                    &node,
                    StreamRequest::PortForward(PortForwardRequest { pod, port }),
                ),
            )
            .await;
            match opened {
                Ok(Ok(stream)) => Ok(stream.into_boxed()),
                Ok(Err(e)) => Err(format!(
                    "error forwarding port {port} to pod {name}, uid {uid}: {e}"
                )),
                Err(_) => Err(format!(
                    "error forwarding port {port} to pod {name}, uid {uid}: node {node} did not answer within {}s",
                    OPEN_TIMEOUT.as_secs()
                )),
            }
        })
    });
    streaming::portforward(&mut request, ports, dial)
        .map(upgraded)
        .map_err(rejection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(query: &str) -> Params {
        let uri: Uri = format!("/x?{query}").parse().expect("uri");
        Params::parse(&uri).expect("query")
    }

    /// The log body reads from the tunnel only as the client reads: unpolled, the writer on
    /// the other side of a small pipe cannot get a byte through; polled, everything arrives in
    /// order and the body ends with the writer.
    #[tokio::test]
    async fn a_stalled_log_reader_stalls_the_tunnel() {
        use futures::StreamExt;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt;
        let (mut edge, cloud) = tokio::io::duplex(64);
        let written = Arc::new(AtomicUsize::new(0));
        let counter = written.clone();
        let writer = tokio::spawn(async move {
            for i in 0..2000u32 {
                let line = format!("line {i:04}\n");
                edge.write_all(line.as_bytes()).await.expect("write");
                counter.fetch_add(line.len(), Ordering::SeqCst);
            }
            edge.shutdown().await.expect("shutdown");
        });
        let body = log_body(cloud);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            written.load(Ordering::SeqCst) <= 64,
            "the writer got {} bytes past a body nobody polled",
            written.load(Ordering::SeqCst)
        );
        let mut stream = body.into_data_stream();
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("chunk");
            assert!(chunk.len() <= LOG_CHUNK);
            got.extend_from_slice(&chunk);
        }
        writer.await.expect("writer");
        let want: String = (0..2000u32).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(String::from_utf8(got).expect("utf-8"), want);
    }

    #[test]
    fn log_options_are_read_from_the_query() {
        let o = log_options(
            &params("container=c&follow=true&previous=1&timestamps=false&tailLines=10&limitBytes=5&sinceSeconds=3"),
            "p",
        )
        .expect("options");
        assert_eq!(o.container, "c");
        assert!(o.follow && o.previous && !o.timestamps);
        assert_eq!(
            (o.tail_lines, o.limit_bytes, o.since_seconds),
            (Some(10), Some(5), Some(3))
        );
        let o = log_options(&params("sinceTime=2024-01-02T03:04:05Z"), "p").expect("time");
        assert_eq!(o.since_time.as_deref(), Some("2024-01-02T03:04:05Z"));
    }

    #[test]
    fn bad_log_options_are_refused_like_the_apiserver() {
        let e = log_options(
            &params("sinceSeconds=5&sinceTime=2024-01-02T03:04:05Z"),
            "p",
        )
        .expect_err("both");
        assert_eq!((e.code.as_u16(), e.reason), (422, "Invalid"));
        assert!(
            e.message
                .contains("at most one of `sinceTime` or `sinceSeconds`"),
            "{}",
            e.message
        );
        for (query, field) in [
            ("tailLines=-1", "tailLines"),
            ("limitBytes=0", "limitBytes"),
            ("sinceSeconds=-5", "sinceSeconds"),
        ] {
            let e = log_options(&params(query), "p").expect_err(query);
            assert_eq!(e.code.as_u16(), 422, "{query}");
            assert_eq!(e.causes()[0].field, field, "{query}");
            assert!(
                e.message.starts_with("PodLogOptions \"p\" is invalid"),
                "{}",
                e.message
            );
        }
        for query in ["tailLines=ten", "sinceTime=yesterday"] {
            let e = log_options(&params(query), "p").expect_err(query);
            assert_eq!(e.code.as_u16(), 400, "{query}");
        }
    }

    #[test]
    fn containers_are_chosen_like_the_apiserver() {
        let one = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(choose_container(&one, "p", "").expect("only"), "a");
        let two = json!({"spec": {
            "containers": [{"name": "a"}, {"name": "b"}],
            "initContainers": [{"name": "i"}],
        }});
        let e = choose_container(&two, "p", "").expect_err("several");
        assert_eq!(e.code.as_u16(), 400);
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]"
        );
        assert_eq!(choose_container(&two, "p", "i").expect("init"), "i");
        let e = choose_container(&two, "p", "c").expect_err("unknown");
        assert_eq!(e.message, "container c is not valid for pod p");
    }

    #[test]
    fn remote_command_needs_a_stream_and_tty_drops_stderr() {
        let e = rc_options(&params("command=ls")).expect_err("no streams");
        assert_eq!(
            e.message,
            "you must specify at least 1 of stdin, stdout, stderr"
        );
        let o = rc_options(&params("stdin=true&stdout=1&stderr=true&tty=true")).expect("tty");
        assert_eq!(
            o,
            RcOptions {
                stdin: true,
                stdout: true,
                stderr: false,
                tty: true
            }
        );
        let p = params("stdin=&stdout=FALSE&stderr=0&tty=yes");
        assert!(p.flag("stdin") && !p.flag("stdout") && !p.flag("stderr") && p.flag("tty"));
        assert!(!p.flag("follow"));
        assert_eq!(
            params("command=sh&command=-c&command=exit%203").all("command"),
            ["sh", "-c", "exit 3"]
        );
    }

    #[test]
    fn ports_accept_lists_and_refuse_garbage() {
        assert_eq!(
            ports(&params("ports=80&ports=81,82")).expect("ports"),
            [80, 81, 82]
        );
        assert!(ports(&params("")).expect("none").is_empty());
        for bad in ["ports=0", "ports=70000", "ports=http"] {
            let e = ports(&params(bad)).expect_err(bad);
            assert_eq!(e.code.as_u16(), 400, "{bad}");
        }
    }

    #[test]
    fn open_errors_keep_their_status_and_message() {
        let e = open_error(OpenError::Disconnected {
            node: "edge-1".into(),
            since: None,
        });
        assert_eq!((e.code.as_u16(), e.reason), (503, "ServiceUnavailable"));
        assert_eq!(e.message, "node edge-1 is not connected to cloudcore");
    }
}
