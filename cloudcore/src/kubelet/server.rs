//! One node's kubelet listener: TLS (a serving certificate from the cluster CA for the advertise
//! address and the node name; client certificates asked for but checked per request against
//! the cluster's client CA, so a stranger's certificate gets a 401 rather than a TLS alert),
//! HTTP/1.1 with upgrades, authentication and authorization ([`super::auth`]), then the
//! kubelet's paths, each reaching the node's edge through [`crate::streams::Streams`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proto::stream::{
    AttachRequest, ExecRequest, LogsRequest, PodTarget, PortForwardRequest, RcCodec, RcFrame,
    StreamRequest,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{BytesCodec, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{self, Auth};
use crate::streams::{OpenError, Slotted, TunnelStream};

/// A TLS handshake that takes longer than this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Output `/run` keeps (the kubelet returns it in one response).
const RUN_OUTPUT_LIMIT: usize = 4 * 1024 * 1024;

/// What one node's listener serves.
pub struct NodeServer {
    pub node: String,
    pub shared: Arc<crate::hub::Shared>,
    pub auth: Arc<Auth>,
    /// Several replicas: where each node's session is, to forward connections for a node
    /// whose session is on another replica.
    pub owners: Option<Arc<crate::ha::sessions::Owners>>,
}

impl NodeServer {
    /// Another replica's kubelet endpoint for this node, when that replica holds the node's
    /// session and this one does not.
    fn forward_target(&self) -> Option<SocketAddr> {
        if self.shared.presence.is_connected(&self.node) {
            return None;
        }
        self.owners.as_ref()?.forward_to(&self.node)
    }
}

/// Connects to another replica's kubelet endpoint for the node, to forward a connection to.
async fn connect_owner(node: &NodeServer, to: SocketAddr) -> Option<tokio::net::TcpStream> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tokio::net::TcpStream::connect(to)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::warn!(node.name = %node.node, to = %to, error = %e, "cannot reach the replica named as holding the node's session; answering here");
            None
        }
        Err(_) => {
            tracing::warn!(node.name = %node.node, to = %to, "no answer from the replica named as holding the node's session; answering here");
            None
        }
    }
}

/// What a replica writes before the bytes of a connection it forwards: a PROXY protocol v2
/// header with the LOCAL command and no addresses (the signature, version 2 + LOCAL, family
/// UNSPEC, length 0). The replica it reaches answers such a connection itself and never
/// forwards it again, so two replicas whose views of a node's owner disagree for a moment
/// cannot pass a connection back and forth. A TLS connection starts with a handshake record
/// (0x16), never with this header's first byte, so the two cannot be confused.
const FORWARDED_MARK: [u8; 16] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00, 0x00,
];

/// Whether the connection was forwarded by another replica ([`FORWARDED_MARK`]); the mark is
/// consumed. Anything else is left unread for the TLS handshake.
async fn take_forwarded_mark(tcp: &mut tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 || first[0] != FORWARDED_MARK[0] {
        return Ok(false);
    }
    let mut mark = [0u8; FORWARDED_MARK.len()];
    tokio::io::AsyncReadExt::read_exact(tcp, &mut mark).await?;
    if mark != FORWARDED_MARK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a PROXY protocol header other than the replicas' own forwarding mark",
        ));
    }
    Ok(true)
}

/// Carries a connection for a node whose session is on another replica to that replica's
/// kubelet endpoint for the node, bytes both ways, after [`FORWARDED_MARK`]: TLS,
/// authentication and authorization are that replica's, as if the apiserver had dialled it
/// (its serving certificate comes from the same cluster CA).
async fn forward(
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    node: &NodeServer,
    to: SocketAddr,
    mut upstream: tokio::net::TcpStream,
) {
    if let Err(e) = upstream.write_all(&FORWARDED_MARK).await {
        tracing::warn!(node.name = %node.node, to = %to, error = %e, "cannot forward a kubelet connection to the replica holding the session");
        return;
    }
    node.shared.metrics.ha.streams_forwarded.inc();
    tracing::debug!(node.name = %node.node, peer.addr = %peer, to = %to, "kubelet connection forwarded to the replica holding the session");
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
}

/// Building a listener's TLS failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot issue the kubelet serving certificate")]
    Pki(#[from] crate::pki::PkiError),
    #[error("cannot build the kubelet listener's TLS configuration")]
    Tls(#[from] rustls::Error),
}

/// Client certificates are asked for and their handshake signature checked, but the chain is
/// verified per request against the client CA of the moment ([`Auth::authenticate`]).
#[derive(Debug)]
struct ChainCheckedLater {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for ChainCheckedLater {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS 1.2 and 1.3 (Go's client), ALPN http/1.1 only (upgrades need it), a fresh serving
/// certificate for `sans`.
pub fn tls_config(
    ca: &crate::pki::ClusterCa,
    sans: &[String],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = crate::pki::crypto_provider();
    let (chain, key) = ca.issue_server_certificate(sans)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ChainCheckedLater { provider }))
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Serves one node's listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    node: Arc<NodeServer>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(node.name = %node.node, error = %e, "kubelet accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let node = node.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let mut tcp = tcp;
            // A connection another replica forwarded is answered here, whatever this
            // replica believes about the owner: a connection is forwarded at most once.
            let forwarded =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, take_forwarded_mark(&mut tcp))
                    .await
                {
                    Ok(Ok(forwarded)) => forwarded,
                    Ok(Err(e)) => {
                        tracing::debug!(node.name = %node.node, peer.addr = %peer, error = %e, "kubelet connection dropped before TLS");
                        return;
                    }
                    Err(_) => return,
                };
            // A dead holder (its edges not yet elsewhere) is answered here: the node is
            // then disconnected, and the caller is told so and since when.
            if !forwarded
                && let Some(to) = node.forward_target()
                && let Some(upstream) = connect_owner(&node, to).await
            {
                tokio::select! {
                    _ = forward(tcp, peer, &node, to, upstream) => {}
                    _ = shutdown.cancelled() => {}
                }
                return;
            }
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(node.name = %node.node, peer.addr = %peer, error = %e, "kubelet TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let certs: Option<Arc<Vec<CertificateDer<'static>>>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.to_vec()));
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let node = node.clone();
                let certs = certs.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(node.handle(certs.as_deref().map(Vec::as_slice), request).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer.addr = %peer, error = %e, "kubelet connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tracker.wait()).await;
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        429 => "TooManyRequests",
        501 => "NotImplemented",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

/// An error as a Kubernetes `Status` (what the kubelet writes for streaming paths).
pub fn status_response(code: u16, message: &str) -> hyper::Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason_of(code),
        "code": code,
    });
    hyper::Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

/// An error as plain text (what the kubelet writes for logs, stats and metrics).
fn text_response(code: u16, message: &str) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("{message}\n")))
        .unwrap_or_default()
}

/// How a path answers its errors.
#[derive(Debug, Clone, Copy)]
enum ErrorShape {
    /// A `Status` (exec, attach, port-forward, run), as the kubelet's streaming paths.
    Status,
    /// Plain text, and 500 for any code but 400 and 404: kube-apiserver's `pods/log` proxy
    /// keeps the kubelet's body as the message only for 400 and 500 (others become a generic
    /// "the server is currently unable to handle the request"), and the message, naming the
    /// node and why, is what `kubectl logs` must show.
    Logs,
}

impl ErrorShape {
    fn respond(self, code: u16, message: &str) -> hyper::Response<Body> {
        match self {
            ErrorShape::Status => status_response(code, message),
            ErrorShape::Logs if matches!(code, 400 | 404 | 500) => text_response(code, message),
            ErrorShape::Logs => text_response(500, message),
        }
    }
}

/// The query as name/value pairs, in order (a repeated `command` stays repeated).
fn query_pairs(uri: &http::Uri) -> Result<Vec<(String, String)>, String> {
    serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|e| format!("malformed query string: {e}"))
}

fn flag(pairs: &[(String, String)], name: &str) -> bool {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .is_some_and(|(_, v)| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn number(pairs: &[(String, String)], name: &str) -> Result<Option<u64>, String> {
    match pairs.iter().rev().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a non-negative integer")),
    }
}

/// `/containerLogs` options from the kubelet's query names.
fn logs_request(
    pod: PodTarget,
    container: &str,
    pairs: &[(String, String)],
) -> Result<LogsRequest, String> {
    let since_time = pairs
        .iter()
        .rev()
        .find(|(k, _)| k == "sinceTime")
        .map(|(_, v)| v.clone());
    if let Some(t) = &since_time
        && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_err()
    {
        return Err(format!("sinceTime={t:?} is not an RFC 3339 time"));
    }
    Ok(LogsRequest {
        pod,
        container: container.to_string(),
        follow: flag(pairs, "follow"),
        previous: flag(pairs, "previous"),
        timestamps: flag(pairs, "timestamps"),
        tail_lines: number(pairs, "tailLines")?,
        since_seconds: number(pairs, "sinceSeconds")?,
        since_time,
        limit_bytes: number(pairs, "limitBytes")?,
    })
}

/// `input/output/error/tty`, the kubelet's names (`stdin/stdout/stderr` are accepted too).
fn rc_options(pairs: &[(String, String)]) -> streaming::RcOptions {
    streaming::RcOptions {
        stdin: flag(pairs, "input") || flag(pairs, "stdin"),
        stdout: flag(pairs, "output") || flag(pairs, "stdout"),
        stderr: flag(pairs, "error") || flag(pairs, "stderr"),
        tty: flag(pairs, "tty"),
    }
}

/// A tunnel stream's halves; its slot in the edge's stream cap rides on the reader.
fn halves(stream: TunnelStream) -> (quinn::SendStream, Slotted<quinn::RecvStream>) {
    stream.into_io()
}

impl NodeServer {
    /// Authenticates, authorizes and serves one request.
    pub async fn handle(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        request: hyper::Request<Incoming>,
    ) -> hyper::Response<Body> {
        let attributes = auth::attributes(request.method(), request.uri().path());
        let user = match self.auth.authenticate(certs, request.headers()).await {
            Ok(user) => user,
            Err(denial) => return status_response(denial.code(), denial.message()),
        };
        if let Err(denial) = self.auth.authorize(&user, &self.node, &attributes).await {
            return status_response(denial.code(), denial.message());
        }
        self.route(request).await
    }

    async fn route(&self, request: hyper::Request<Incoming>) -> hyper::Response<Body> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = request.method().clone();
        let read = method == http::Method::GET || method == http::Method::HEAD;
        let stream = read || method == http::Method::POST;
        match segments.as_slice() {
            ["healthz"] if read => self.healthz().await,
            ["metrics", "resource"] if read => self.resource_metrics().await,
            ["stats", "summary"] if read => self.stats_summary().await,
            ["containerLogs", ns, pod, container] if read => {
                self.container_logs(ns, pod, container, request.uri()).await
            }
            [kind @ ("exec" | "attach"), ns, pod, container] if stream => {
                let kind = *kind;
                let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
                self.remote_command(kind, &ns, &pod, None, &container, request)
                    .await
            }
            [kind @ ("exec" | "attach"), ns, pod, uid, container] if stream => {
                let kind = *kind;
                let (ns, pod, uid, container) = (
                    ns.to_string(),
                    pod.to_string(),
                    uid.to_string(),
                    container.to_string(),
                );
                self.remote_command(kind, &ns, &pod, Some(&uid), &container, request)
                    .await
            }
            ["portForward", ns, pod] if stream => {
                let (ns, pod) = (ns.to_string(), pod.to_string());
                self.port_forward(&ns, &pod, None, request).await
            }
            ["portForward", ns, pod, uid] if stream => {
                let (ns, pod, uid) = (ns.to_string(), pod.to_string(), uid.to_string());
                self.port_forward(&ns, &pod, Some(&uid), request).await
            }
            ["run", ns, pod, container] if method == http::Method::POST => {
                self.run(ns, pod, None, container, request.uri()).await
            }
            ["run", ns, pod, uid, container] if method == http::Method::POST => {
                self.run(ns, pod, Some(uid), container, request.uri()).await
            }
            _ => text_response(404, &format!("404 page not found: {method} {path}")),
        }
    }

    /// `OpenError::Disconnected` for this node, with since when (the registry's last sight of
    /// it), when its edge has no session; checked before anything else so that every path of
    /// a lost node answers at once, naming it.
    async fn disconnected(&self) -> Option<OpenError> {
        if self.shared.presence.is_connected(&self.node) {
            return None;
        }
        let shared = self.shared.clone();
        let node = self.node.clone();
        let since = tokio::task::spawn_blocking(move || shared.registry.node_last_seen(&node))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
        Some(OpenError::Disconnected {
            node: self.node.clone(),
            since,
        })
    }

    async fn healthz(&self) -> hyper::Response<Body> {
        match self.disconnected().await {
            None => hyper::Response::new(Body::from("ok")),
            Some(e) => text_response(e.http_status(), &e.to_string()),
        }
    }

    async fn resource_metrics(&self) -> hyper::Response<Body> {
        if let Some(e) = self.disconnected().await {
            return text_response(e.http_status(), &e.to_string());
        }
        match self.shared.streams.stats(&self.node).await {
            Ok(summary) => hyper::Response::builder()
                .header(http::header::CONTENT_TYPE, super::metrics::TEXT_FORMAT)
                .body(Body::from(super::metrics::resource_metrics(
                    &summary,
                    time::OffsetDateTime::now_utc(),
                )))
                .unwrap_or_default(),
            Err(e) => text_response(e.http_status(), &e.to_string()),
        }
    }

    async fn stats_summary(&self) -> hyper::Response<Body> {
        if let Some(e) = self.disconnected().await {
            return text_response(e.http_status(), &e.to_string());
        }
        match self.shared.streams.stats(&self.node).await {
            Ok(summary) => hyper::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    super::metrics::summary_json(&summary).to_string(),
                ))
                .unwrap_or_default(),
            Err(e) => text_response(e.http_status(), &e.to_string()),
        }
    }

    /// The pod, if it is bound to this listener's node (and has `uid`, when the path names
    /// one); a pod of another node is never reached through this one.
    async fn pod_here(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        shape: ErrorShape,
    ) -> Result<PodTarget, hyper::Response<Body>> {
        if let Some(e) = self.disconnected().await {
            return Err(shape.respond(e.http_status(), &e.to_string()));
        }
        let (node, target) = self
            .shared
            .streams
            .locate(namespace, name)
            .map_err(|e| match e {
                // Bound elsewhere: this node's endpoint does not say where.
                OpenError::NotEdge { .. } => shape.respond(
                    404,
                    &format!(
                        "pod {namespace}/{name} is not on node {}: this endpoint serves only that node's pods",
                        self.node
                    ),
                ),
                e => shape.respond(e.http_status(), &e.to_string()),
            })?;
        if node != self.node {
            return Err(shape.respond(
                404,
                &format!(
                    "pod {namespace}/{name} is not on node {}: this endpoint serves only that node's pods",
                    self.node
                ),
            ));
        }
        if uid.is_some_and(|u| u != target.uid) {
            return Err(shape.respond(
                404,
                &format!(
                    "pod {namespace}/{name} with uid {} not found on node {}",
                    uid.unwrap_or_default(),
                    self.node
                ),
            ));
        }
        Ok(target)
    }

    async fn open(&self, request: StreamRequest) -> Result<TunnelStream, OpenError> {
        self.shared.streams.open(&self.node, request).await
    }

    async fn container_logs(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        uri: &http::Uri,
    ) -> hyper::Response<Body> {
        let shape = ErrorShape::Logs;
        let pairs = match query_pairs(uri) {
            Ok(p) => p,
            Err(e) => return shape.respond(400, &e),
        };
        let pod = match self.pod_here(namespace, name, None, shape).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let request = match logs_request(pod, container, &pairs) {
            Ok(r) => r,
            Err(e) => return shape.respond(400, &e),
        };
        let stream = match self.open(StreamRequest::Logs(request)).await {
            Ok(s) => s,
            Err(e) => return shape.respond(e.http_status(), &e.to_string()),
        };
        let (mut write, read) = halves(stream);
        // Nothing flows from the cloud on a logs stream.
        let _ = write.shutdown().await;
        // Read only as fast as the client takes it: QUIC flow control stalls the edge.
        let body = FramedRead::new(read, BytesCodec::new()).map_ok(|b| b.freeze());
        hyper::Response::builder()
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(Body::from_stream(body))
            .unwrap_or_default()
    }

    async fn remote_command(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        container: &str,
        mut request: hyper::Request<Incoming>,
    ) -> hyper::Response<Body> {
        let shape = ErrorShape::Status;
        let pairs = match query_pairs(request.uri()) {
            Ok(p) => p,
            Err(e) => return shape.respond(400, &e),
        };
        let options = rc_options(&pairs);
        let pod = match self.pod_here(namespace, name, uid, shape).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let stream_request = if kind == "exec" {
            let command: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect();
            if command.is_empty() {
                return shape.respond(400, "exec needs a command (query parameter command)");
            }
            StreamRequest::Exec(ExecRequest {
                pod,
                container: container.to_string(),
                command,
                stdin: options.stdin,
                stdout: options.stdout,
                stderr: options.stderr,
                tty: options.tty,
            })
        } else {
            StreamRequest::Attach(AttachRequest {
                pod,
                container: container.to_string(),
                stdin: options.stdin,
                stdout: options.stdout,
                stderr: options.stderr,
                tty: options.tty,
            })
        };
        if !streaming::is_upgrade(&request) {
            return shape.respond(400, "Upgrade request required (SPDY/3.1 or websocket)");
        }
        // The tunnel first: a refusal is still a plain HTTP status, not a broken upgrade.
        let stream = match self.open(stream_request).await {
            Ok(s) => s,
            Err(e) => return shape.respond(e.http_status(), &e.to_string()),
        };
        let (write, read) = halves(stream);
        match streaming::remotecommand(&mut request, options, (Box::pin(write), Box::pin(read))) {
            Ok(response) => response.map(Body::from),
            Err(rejection) => shape.respond(rejection.code, &rejection.message),
        }
    }

    async fn port_forward(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        mut request: hyper::Request<Incoming>,
    ) -> hyper::Response<Body> {
        let shape = ErrorShape::Status;
        let pairs = match query_pairs(request.uri()) {
            Ok(p) => p,
            Err(e) => return shape.respond(400, &e),
        };
        let mut ports = Vec::new();
        for (_, v) in pairs.iter().filter(|(k, _)| k == "port") {
            for p in v.split(',') {
                match p.trim().parse::<u16>() {
                    Ok(port) if port > 0 => ports.push(port),
                    _ => {
                        return shape.respond(400, &format!("port {p:?} is not a port number"));
                    }
                }
            }
        }
        let pod = match self.pod_here(namespace, name, uid, shape).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        if !streaming::is_upgrade(&request) {
            return shape.respond(400, "Upgrade request required (SPDY/3.1 or websocket)");
        }
        // A SPDY session names its ports only after the upgrade: check the node's session now.
        if let Err(e) = self.shared.streams.check_live(&self.node) {
            return shape.respond(e.http_status(), &e.to_string());
        }
        let streams = self.shared.streams.clone();
        let node = self.node.clone();
        let dial: streaming::Dial = Arc::new(move |port| {
            let streams = streams.clone();
            let node = node.clone();
            let pod = pod.clone();
            Box::pin(async move {
                let request = StreamRequest::PortForward(PortForwardRequest { pod, port });
                match streams.open(&node, request).await {
                    Ok(stream) => Ok(stream.into_boxed()),
                    Err(e) => Err(e.to_string()),
                }
            })
        });
        match streaming::portforward(&mut request, ports, dial) {
            Ok(response) => response.map(Body::from),
            Err(rejection) => shape.respond(rejection.code, &rejection.message),
        }
    }

    /// Runs `cmd` without stdin and answers its combined output, as the kubelet's `/run`.
    async fn run(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        container: &str,
        uri: &http::Uri,
    ) -> hyper::Response<Body> {
        let shape = ErrorShape::Status;
        let pairs = match query_pairs(uri) {
            Ok(p) => p,
            Err(e) => return shape.respond(400, &e),
        };
        let command: Vec<String> = pairs
            .iter()
            .rev()
            .find(|(k, _)| k == "cmd")
            .map(|(_, v)| v.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        if command.is_empty() {
            return shape.respond(400, "run needs a command (query parameter cmd)");
        }
        let pod = match self.pod_here(namespace, name, uid, shape).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        let request = StreamRequest::Exec(ExecRequest {
            pod,
            container: container.to_string(),
            command: command.clone(),
            stdin: false,
            stdout: true,
            stderr: true,
            tty: false,
        });
        let stream = match self.open(request).await {
            Ok(s) => s,
            Err(e) => return shape.respond(e.http_status(), &e.to_string()),
        };
        let (mut write, read) = halves(stream);
        let _ = write.shutdown().await;
        let mut frames = FramedRead::new(read, RcCodec);
        let mut output = Vec::new();
        let exit = loop {
            match frames.next().await {
                Some(Ok(RcFrame::Stdout(b) | RcFrame::Stderr(b))) => {
                    let room = RUN_OUTPUT_LIMIT.saturating_sub(output.len());
                    output.extend_from_slice(&b[..b.len().min(room)]);
                }
                Some(Ok(RcFrame::Exit(status))) => break Ok(status),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(e.to_string()),
                None => break Err("the stream ended before the command's exit status".into()),
            }
        };
        drop(write);
        match exit {
            Ok(status) if status.success() => hyper::Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(Body::from(Bytes::from(output)))
                .unwrap_or_default(),
            Ok(status) => {
                let how = match status.code {
                    Some(code) => format!("exited with {code}"),
                    None => format!("failed: {}", status.message),
                };
                shape.respond(
                    500,
                    &format!(
                        "command {:?} {how}; output: {}",
                        command.join(" "),
                        String::from_utf8_lossy(&output)
                    ),
                )
            }
            Err(e) => shape.respond(502, &format!("stream to node {} failed: {e}", self.node)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback TCP pair: (the accepted end, the dialling end).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dial = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"));
        let (accepted, dialled) = tokio::join!(listener.accept(), dial);
        (accepted.expect("accept").0, dialled.expect("dial"))
    }

    #[tokio::test]
    async fn a_forwarded_connection_is_recognised_and_its_mark_consumed() {
        let (mut accepted, mut dialled) = tcp_pair().await;
        dialled.write_all(&FORWARDED_MARK).await.expect("mark");
        dialled.write_all(&[0x16, 0x03, 0x01]).await.expect("hello");
        assert!(take_forwarded_mark(&mut accepted).await.expect("read"));
        let mut rest = [0u8; 3];
        tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut rest)
            .await
            .expect("rest");
        assert_eq!(
            rest,
            [0x16, 0x03, 0x01],
            "the TLS bytes after the mark are untouched"
        );
    }

    #[tokio::test]
    async fn a_direct_tls_connection_is_not_taken_for_a_forwarded_one_and_loses_no_byte() {
        let (mut accepted, mut dialled) = tcp_pair().await;
        dialled
            .write_all(&[0x16, 0x03, 0x01, 0x00])
            .await
            .expect("hello");
        assert!(!take_forwarded_mark(&mut accepted).await.expect("read"));
        let mut first = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut first)
            .await
            .expect("bytes");
        assert_eq!(first, [0x16, 0x03, 0x01, 0x00]);
    }

    #[tokio::test]
    async fn another_proxy_header_is_refused_not_passed_to_tls() {
        let (mut accepted, mut dialled) = tcp_pair().await;
        let mut other = FORWARDED_MARK;
        other[12] = 0x21; // PROXY command, which carries addresses we do not read
        dialled.write_all(&other).await.expect("header");
        let err = take_forwarded_mark(&mut accepted)
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    fn pairs(query: &str) -> Vec<(String, String)> {
        let uri: http::Uri = format!("/x?{query}").parse().expect("uri");
        query_pairs(&uri).expect("pairs")
    }

    #[test]
    fn logs_options_use_the_kubelets_query_names() {
        let pod = PodTarget {
            namespace: "default".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        let r = logs_request(
            pod.clone(),
            "c",
            &pairs("follow=true&previous=true&timestamps=true&tailLines=5&sinceSeconds=60&limitBytes=100"),
        )
        .expect("request");
        assert!(r.follow && r.previous && r.timestamps);
        assert_eq!(
            (r.tail_lines, r.since_seconds, r.limit_bytes),
            (Some(5), Some(60), Some(100))
        );
        let r = logs_request(pod.clone(), "c", &pairs("sinceTime=2026-12-04T21:00:00Z"))
            .expect("request");
        assert_eq!(r.since_time.as_deref(), Some("2026-12-04T21:00:00Z"));
        assert!(!r.follow);
        let err = logs_request(pod.clone(), "c", &pairs("tailLines=-1")).unwrap_err();
        assert!(err.contains("tailLines"), "{err}");
        let err = logs_request(pod, "c", &pairs("sinceTime=yesterday")).unwrap_err();
        assert!(err.contains("sinceTime"), "{err}");
    }

    #[test]
    fn remote_command_options_use_input_output_error_tty() {
        let o = rc_options(&pairs("command=cat&input=1&output=1&error=0&tty=0"));
        assert_eq!(
            o,
            streaming::RcOptions {
                stdin: true,
                stdout: true,
                stderr: false,
                tty: false
            }
        );
        let o = rc_options(&pairs("command=sh&command=-c&command=true&error=1&tty=1"));
        assert!(o.stderr && o.tty && !o.stdin && !o.stdout);
    }

    #[test]
    fn status_bodies_name_reason_and_code() {
        let r = status_response(503, "node gw-1 is not connected to cloudcore");
        assert_eq!(r.status(), 503);
        assert_eq!(reason_of(401), "Unauthorized");
        assert_eq!(reason_of(403), "Forbidden");
    }
}
