//! Streams the cloud opens on this edge's session connection ([`proto::stream`]): the edge
//! checks that the pod is its own (name and uid, in its store and its runtime), then serves
//! logs from the container log files ([`logs`]), exec/attach/port-forward through the CRI
//! streaming server ([`remote`]) and resource stats ([`stats`]).
//!
//! The edge trusts nothing in a request: the pod must be in its store with that namespace, name
//! and uid and bound to this node, whatever the cloud checked before opening the stream.

pub mod logs;
pub mod remote;
pub mod stats;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use proto::stream::{PodTarget, Refusal, RefusalCode, StreamError, StreamReply, StreamRequest};
use tokio::io::AsyncWrite;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::cri::Cri;
use crate::metrics::Metrics;
use crate::pods::spec::{LABEL_CONTAINER_NAME, LABEL_MANAGED_BY, LABEL_POD_UID, MANAGED_BY};
use crate::store::{Store, StoreError};

/// Streams served at once; more are refused with `TooManyStreams`.
pub const MAX_STREAMS: usize = 128;
/// Streams the cloud may open at once at the QUIC level: above [`MAX_STREAMS`], so that a
/// stream over the cap reaches the dispatcher and gets a clear refusal instead of waiting for
/// QUIC stream credit.
pub const TRANSPORT_MAX_STREAMS: u32 = MAX_STREAMS as u32 + 32;
/// How long the cloud may take to send a stream's request after opening it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header accepted (an exec command line is the largest part).
const MAX_REQUEST: usize = 64 * 1024;

/// What serving streams needs from the rest of the edge; one per `edgecore run`.
#[derive(Debug)]
pub struct Dispatcher {
    node_name: String,
    data_dir: PathBuf,
    /// `None` with `--no-pod-runtime`: exec, attach, port-forward and stats are refused.
    cri: Option<Cri>,
    /// A read-only handle on `edge.db`, opened at the first stream. A std mutex: held only on
    /// a blocking thread for one lookup.
    store: Mutex<Option<Store>>,
    /// Changes after each commit of the store (a pod deleted ends its logs streams).
    store_changed: watch::Receiver<u64>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// The node's last CPU sample, for a rate between two stats streams.
    sampler: tokio::sync::Mutex<stats::Sampler>,
}

impl Dispatcher {
    pub fn new(
        node_name: String,
        data_dir: PathBuf,
        cri: Option<Cri>,
        store_changed: watch::Receiver<u64>,
        metrics: Arc<Metrics>,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            node_name,
            data_dir,
            cri,
            store: Mutex::new(None),
            store_changed,
            slots: Arc::new(Semaphore::new(MAX_STREAMS)),
            metrics,
            sampler: tokio::sync::Mutex::default(),
        })
    }

    /// The stored pod `target` if this node runs it: same namespace, name and uid, bound here.
    async fn own_pod(self: &Arc<Self>, target: &PodTarget) -> Result<Pod, Refusal> {
        let this = self.clone();
        let key = proto::sync::ObjectKey::new("Pod", &target.namespace, &target.name);
        let stored = tokio::task::spawn_blocking(move || {
            let mut store = this.store.lock().unwrap_or_else(|p| p.into_inner());
            if store.is_none() {
                *store = Some(Store::open_read_only(&this.data_dir)?);
            }
            let Some(store) = store.as_ref() else {
                return Ok(None);
            };
            store.get(&key)
        })
        .await
        .map_err(|e| runtime(format!("store lookup failed: {e}")))?
        .map_err(|e: StoreError| runtime(format!("cannot read the store: {e}")))?;
        let not_ours = || Refusal {
            code: RefusalCode::PodNotFound,
            message: format!(
                "pod {}/{} (uid {}) does not run on node {}",
                target.namespace, target.name, target.uid, self.node_name
            ),
        };
        let stored = stored.ok_or_else(not_ours)?;
        if stored.uid != target.uid || target.uid.is_empty() {
            return Err(not_ours());
        }
        let pod: Pod = serde_json::from_slice(&stored.body)
            .map_err(|e| runtime(format!("the stored pod is unreadable: {e}")))?;
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if node != Some(self.node_name.as_str()) {
            return Err(not_ours());
        }
        Ok(pod)
    }

    /// Waits until the pod `target` is no longer this node's (deleted from the store).
    async fn pod_gone(self: Arc<Self>, target: PodTarget) {
        let mut changed = self.store_changed.clone();
        loop {
            if changed.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Err(Refusal {
                code: RefusalCode::PodNotFound,
                ..
            }) = self.own_pod(&target).await
            {
                return;
            }
        }
    }

    fn cri(&self, what: &str) -> Result<&Cri, Refusal> {
        self.cri.as_ref().ok_or_else(|| {
            runtime(format!(
                "node {} runs edgecore without a container runtime (--no-pod-runtime): no {what}",
                self.node_name
            ))
        })
    }
}

fn runtime(message: String) -> Refusal {
    Refusal {
        code: RefusalCode::Runtime,
        message,
    }
}

/// Writes a refusal as the stream's reply.
pub(crate) async fn refuse<W: AsyncWrite + Unpin>(
    send: &mut W,
    code: RefusalCode,
    message: String,
) -> std::io::Result<()> {
    proto::stream::write_header(send, &StreamReply::Refused(Refusal { code, message }))
        .await
        .map_err(std::io::Error::other)
}

/// The container `asked` of `pod` (any of its containers, init and ephemeral ones included);
/// an empty name picks the only regular container.
pub fn container_name(pod: &Pod, asked: &str) -> Result<String, Refusal> {
    let spec = pod.spec.as_ref();
    let regular: Vec<&str> = spec
        .map(|s| s.containers.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    let all: Vec<&str> = regular
        .iter()
        .copied()
        .chain(
            spec.and_then(|s| s.init_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| c.name.as_str()),
        )
        .chain(
            spec.and_then(|s| s.ephemeral_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| c.name.as_str()),
        )
        .collect();
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    if asked.is_empty() {
        return match regular.as_slice() {
            [one] => Ok(one.to_string()),
            _ => Err(Refusal {
                code: RefusalCode::BadRequest,
                message: format!(
                    "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                    all.join(" ")
                ),
            }),
        };
    }
    if all.contains(&asked) {
        return Ok(asked.to_string());
    }
    Err(Refusal {
        code: RefusalCode::ContainerNotFound,
        message: format!(
            "container {asked} is not valid for pod {pod_name}, choose one of: [{}]",
            all.join(" ")
        ),
    })
}

/// The id of the newest running instance of container `name` of pod `uid`.
async fn running_container(cri: &Cri, pod: &PodTarget, name: &str) -> Result<String, Refusal> {
    let labels = HashMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_POD_UID.to_string(), pod.uid.clone()),
        (LABEL_CONTAINER_NAME.to_string(), name.to_string()),
    ]);
    cri.list_containers(labels)
        .await
        .map_err(|e| runtime(e.to_string()))?
        .into_iter()
        .filter(|c| c.state == k8s_cri::v1::ContainerState::ContainerRunning as i32)
        .max_by_key(|c| c.created_at)
        .map(|c| c.id)
        .ok_or_else(|| Refusal {
            code: RefusalCode::ContainerNotRunning,
            message: format!(
                "container {name} in pod {}/{} is not running",
                pod.namespace, pod.name
            ),
        })
}

/// The id of the pod's ready sandbox (port-forward connects inside its network namespace).
async fn ready_sandbox(cri: &Cri, pod: &PodTarget) -> Result<String, Refusal> {
    let labels = HashMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_POD_UID.to_string(), pod.uid.clone()),
    ]);
    cri.list_pod_sandboxes(labels)
        .await
        .map_err(|e| runtime(e.to_string()))?
        .into_iter()
        .filter(|s| s.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32)
        .max_by_key(|s| s.created_at)
        .map(|s| s.id)
        .ok_or_else(|| Refusal {
            code: RefusalCode::ContainerNotRunning,
            message: format!(
                "pod {}/{} has no running sandbox to forward a port into",
                pod.namespace, pod.name
            ),
        })
}

/// A request checked against this node: what to run.
enum Checked {
    Logs { uid: String, container: String },
    Exec { container_id: String },
    Attach { container_id: String },
    PortForward { sandbox_id: String },
    Stats,
}

/// Checks `request` against the store and the runtime.
async fn check(dispatcher: &Arc<Dispatcher>, request: &StreamRequest) -> Result<Checked, Refusal> {
    let bad = |message: &str| Refusal {
        code: RefusalCode::BadRequest,
        message: message.to_string(),
    };
    match request {
        StreamRequest::Stats => {
            dispatcher.cri("stats")?;
            Ok(Checked::Stats)
        }
        StreamRequest::Logs(r) => {
            let pod = dispatcher.own_pod(&r.pod).await?;
            let container = container_name(&pod, &r.container)?;
            Ok(Checked::Logs {
                uid: r.pod.uid.clone(),
                container,
            })
        }
        StreamRequest::Exec(r) => {
            if r.command.is_empty() {
                return Err(bad("exec needs a command"));
            }
            if !(r.stdin || r.stdout || r.stderr) {
                return Err(bad("you must specify at least 1 of stdin, stdout, stderr"));
            }
            let cri = dispatcher.cri("exec")?;
            let pod = dispatcher.own_pod(&r.pod).await?;
            let container = container_name(&pod, &r.container)?;
            let container_id = running_container(cri, &r.pod, &container).await?;
            Ok(Checked::Exec { container_id })
        }
        StreamRequest::Attach(r) => {
            if !(r.stdin || r.stdout || r.stderr) {
                return Err(bad("you must specify at least 1 of stdin, stdout, stderr"));
            }
            let cri = dispatcher.cri("attach")?;
            let pod = dispatcher.own_pod(&r.pod).await?;
            let container = container_name(&pod, &r.container)?;
            let container_id = running_container(cri, &r.pod, &container).await?;
            Ok(Checked::Attach { container_id })
        }
        StreamRequest::PortForward(r) => {
            if r.port == 0 {
                return Err(bad("port-forward needs a port between 1 and 65535"));
            }
            let cri = dispatcher.cri("port-forward")?;
            dispatcher.own_pod(&r.pod).await?;
            let sandbox_id = ready_sandbox(cri, &r.pod).await?;
            Ok(Checked::PortForward { sandbox_id })
        }
    }
}

/// Decrements `edgecore_streams_open{kind}` when the stream ends.
struct OpenStream(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one stream the cloud opened: reads its request, checks it, and runs its kind until
/// either side ends it or `cancel` (the session's end) fires.
pub async fn serve_stream(
    dispatcher: Arc<Dispatcher>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    cancel: CancellationToken,
) {
    let request = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        proto::stream::read_header::<_, StreamRequest>(&mut recv, MAX_REQUEST),
    )
    .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            let code = match &e {
                StreamError::Malformed(m) if m.to_string().contains("unknown variant") => {
                    RefusalCode::Unsupported
                }
                StreamError::Malformed(_) | StreamError::TooLarge { .. } => RefusalCode::BadRequest,
                _ => {
                    tracing::debug!(error = %e, "stream ended before its request");
                    return;
                }
            };
            tracing::debug!(error = %e, "refusing a stream request");
            let _ = refuse(&mut send, code, e.to_string()).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            tracing::debug!("no stream request within {} s", REQUEST_TIMEOUT.as_secs());
            let _ = send.reset(quinn::VarInt::from_u32(0));
            return;
        }
    };
    let kind = request.kind();
    let pod = request
        .pod()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_default();
    let Ok(_slot) = dispatcher.slots.clone().try_acquire_owned() else {
        let message = format!(
            "node {} serves {MAX_STREAMS} streams already, the most it allows; close some and retry",
            dispatcher.node_name
        );
        let _ = refuse(&mut send, RefusalCode::TooManyStreams, message).await;
        let _ = send.finish();
        return;
    };
    let checked = tokio::select! {
        _ = cancel.cancelled() => return,
        checked = check(&dispatcher, &request) => checked,
    };
    let checked = match checked {
        Ok(checked) => checked,
        Err(refusal) => {
            tracing::debug!(kind, %pod, code = ?refusal.code, "refusing a stream: {}", refusal.message);
            let _ = refuse(&mut send, refusal.code, refusal.message).await;
            let _ = send.finish();
            return;
        }
    };
    let open = dispatcher.metrics.stream_open(kind);
    open.inc();
    let _open = OpenStream(open);
    let container = match &request {
        StreamRequest::Logs(r) => r.container.as_str(),
        StreamRequest::Exec(r) => r.container.as_str(),
        StreamRequest::Attach(r) => r.container.as_str(),
        _ => "",
    };
    tracing::debug!(kind, %pod, container, "stream accepted");
    let ended: Result<(), String> = match (checked, &request) {
        (Checked::Logs { uid, container }, StreamRequest::Logs(r)) => {
            // Stop following when the cloud stops reading, the pod leaves the store or the
            // session ends.
            let stop = cancel.child_token();
            let watcher = {
                let (stop, stopped) = (stop.clone(), send.stopped());
                let gone = dispatcher.clone().pod_gone(r.pod.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stopped => {}
                        _ = gone => {}
                        _ = stop.cancelled() => {}
                    }
                    stop.cancel();
                })
            };
            let served =
                logs::serve(&dispatcher.data_dir, &uid, &container, r, &mut send, &stop).await;
            stop.cancel();
            let _ = watcher.await;
            let _ = send.finish();
            served.map_err(|e| e.to_string())
        }
        (Checked::Stats, _) => {
            let result = match dispatcher.cri("stats") {
                Ok(cri) => stats::collect(&dispatcher.node_name, cri, &dispatcher.sampler)
                    .await
                    .map_err(|e| e.to_string()),
                Err(refusal) => Err(refusal.message),
            };
            let written = match result {
                Ok(summary) => {
                    match proto::stream::write_header(&mut send, &StreamReply::Accepted).await {
                        Ok(()) => proto::stream::write_header(&mut send, &summary)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(message) => {
                    let _ = refuse(&mut send, RefusalCode::Runtime, message.clone()).await;
                    Err(message)
                }
            };
            let _ = send.finish();
            written
        }
        (Checked::Exec { container_id }, StreamRequest::Exec(r)) => match dispatcher.cri.as_ref() {
            Some(cri) => tokio::select! {
                _ = cancel.cancelled() => Ok(()),
                done = remote::exec(cri, &container_id, r, send, recv) => done.map_err(|e| e.to_string()),
            },
            None => Ok(()),
        },
        (Checked::Attach { container_id }, StreamRequest::Attach(r)) => {
            match dispatcher.cri.as_ref() {
                Some(cri) => tokio::select! {
                    _ = cancel.cancelled() => Ok(()),
                    done = remote::attach(cri, &container_id, r, send, recv) => done.map_err(|e| e.to_string()),
                },
                None => Ok(()),
            }
        }
        (Checked::PortForward { sandbox_id }, StreamRequest::PortForward(r)) => {
            match dispatcher.cri.as_ref() {
                Some(cri) => tokio::select! {
                    _ = cancel.cancelled() => Ok(()),
                    done = remote::port_forward(cri, &sandbox_id, r.port, send, recv) => done.map_err(|e| e.to_string()),
                },
                None => Ok(()),
            }
        }
        // `check` answers each kind with its own variant.
        _ => Ok(()),
    };
    match ended {
        Ok(()) => tracing::debug!(kind, %pod, container, "stream ended"),
        Err(e) => tracing::debug!(kind, %pod, container, "stream ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use proto::stream::{AttachRequest, LogsRequest};
    use proto::sync::{ObjectKey, StoreOp};

    use super::*;

    /// A real QUIC connection over loopback: the cloud's side (which opens streams) and the
    /// edge's. The endpoints must be kept alive.
    async fn quic_pair() -> (
        quinn::Connection,
        quinn::Connection,
        (quinn::Endpoint, quinn::Endpoint),
    ) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let cert = certified.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .expect("key");
        let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server tls");
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic"),
        ));
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
            .expect("server");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic"),
        ));
        // The edge's transport limits, as `tls` sets them.
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(TRANSPORT_MAX_STREAMS.into());
        client_config.transport_config(Arc::new(transport));
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(client_config);
        let connecting = client
            .connect(server.local_addr().expect("addr"), "localhost")
            .expect("connect");
        let accepting = async { server.accept().await.expect("incoming").await };
        let (cloud, edge) = tokio::join!(accepting, connecting);
        (
            cloud.expect("accepted"),
            edge.expect("connected"),
            (server, client),
        )
    }

    fn pod_op(name: &str, uid: &str, node: &str) -> StoreOp {
        let body = serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"nodeName": node, "containers": [{"name": "app"}, {"name": "side"}]},
        });
        StoreOp::Put {
            key: ObjectKey::new("Pod", "default", name),
            uid: uid.into(),
            resource_version: 1,
            body: serde_json::to_vec(&body).expect("json"),
        }
    }

    fn target(name: &str, uid: &str) -> PodTarget {
        PodTarget {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn logs(name: &str, uid: &str, container: &str, follow: bool) -> StreamRequest {
        StreamRequest::Logs(LogsRequest {
            pod: target(name, uid),
            container: container.into(),
            follow,
            ..Default::default()
        })
    }

    /// An edge whose store holds `web` (bound here) and `other` (bound to gw-2), serving the
    /// streams of `edge` with no container runtime.
    struct Edge {
        dir: tempfile::TempDir,
        store: Store,
        changed: watch::Sender<u64>,
        metrics: Arc<Metrics>,
        cloud: quinn::Connection,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
    }

    impl Edge {
        async fn start() -> Edge {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = Store::open(dir.path()).expect("store");
            store
                .apply(&[
                    pod_op("web", "u-web", "gw-1"),
                    pod_op("other", "u-other", "gw-2"),
                ])
                .expect("apply");
            let (changed, watched) = watch::channel(0);
            let metrics = Arc::new(Metrics::default());
            let dispatcher = Dispatcher::new(
                "gw-1".into(),
                dir.path().to_path_buf(),
                None,
                watched,
                metrics.clone(),
            );
            let (cloud, edge, endpoints) = quic_pair().await;
            tokio::spawn(async move {
                while let Ok((send, recv)) = edge.accept_bi().await {
                    tokio::spawn(serve_stream(
                        dispatcher.clone(),
                        send,
                        recv,
                        CancellationToken::new(),
                    ));
                }
            });
            Edge {
                dir,
                store,
                changed,
                metrics,
                cloud,
                _endpoints: endpoints,
            }
        }

        /// Opens a stream with `request` (any serializable header) and reads the reply.
        async fn open<T: serde::Serialize>(
            &self,
            request: &T,
        ) -> (StreamReply, quinn::SendStream, quinn::RecvStream) {
            let (mut send, mut recv) = self.cloud.open_bi().await.expect("open");
            proto::stream::write_header(&mut send, request)
                .await
                .expect("request");
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                proto::stream::read_header(&mut recv, 1 << 16),
            )
            .await
            .expect("a reply in time")
            .expect("reply");
            (reply, send, recv)
        }

        async fn refusal<T: serde::Serialize>(&self, request: &T) -> Refusal {
            match self.open(request).await.0 {
                StreamReply::Refused(refusal) => refusal,
                other => panic!("not refused: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_edge_serves_only_its_own_pods_by_name_uid_and_node() {
        let edge = Edge::start().await;
        let dir = crate::pods::spec::pod_paths(edge.dir.path(), "u-web")
            .log_dir
            .join("app");
        std::fs::create_dir_all(&dir).expect("log dir");
        std::fs::write(
            dir.join("0.log"),
            "2026-11-24T05:31:04.8Z stdout F hello from web\n",
        )
        .expect("log");
        let (reply, _send, mut recv) = edge.open(&logs("web", "u-web", "app", false)).await;
        assert_eq!(reply, StreamReply::Accepted);
        let body = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
            .await
            .expect("in time")
            .expect("body");
        assert_eq!(String::from_utf8_lossy(&body), "hello from web\n");

        let refusal = edge.refusal(&logs("web", "u-old", "app", false)).await;
        assert_eq!(refusal.code, RefusalCode::PodNotFound);
        assert_eq!(
            refusal.message,
            "pod default/web (uid u-old) does not run on node gw-1"
        );
        // In the store, with its uid, but bound to another node.
        let refusal = edge.refusal(&logs("other", "u-other", "app", false)).await;
        assert_eq!(refusal.code, RefusalCode::PodNotFound);
        let refusal = edge.refusal(&logs("nope", "u-web", "app", false)).await;
        assert_eq!(refusal.code, RefusalCode::PodNotFound);
        let refusal = edge.refusal(&logs("web", "u-web", "db", false)).await;
        assert_eq!(refusal.code, RefusalCode::ContainerNotFound);
        assert_eq!(
            refusal.message,
            "container db is not valid for pod web, choose one of: [app side]"
        );
        let refusal = edge.refusal(&logs("web", "u-web", "side", false)).await;
        assert_eq!(refusal.code, RefusalCode::ContainerNotFound);
        assert!(
            refusal.message.contains("waiting to start"),
            "{}",
            refusal.message
        );
    }

    #[tokio::test]
    async fn without_a_runtime_exec_and_stats_are_refused_and_unknown_kinds_are_unsupported() {
        let edge = Edge::start().await;
        let attach = StreamRequest::Attach(AttachRequest {
            pod: target("web", "u-web"),
            container: "app".into(),
            stdout: true,
            ..Default::default()
        });
        for request in [attach, StreamRequest::Stats] {
            let refusal = edge.refusal(&request).await;
            assert_eq!(refusal.code, RefusalCode::Runtime, "{request:?}");
            assert!(
                refusal.message.contains("without a container runtime"),
                "{}",
                refusal.message
            );
        }
        let refusal = edge.refusal(&serde_json::json!({"kind": "teleport"})).await;
        assert_eq!(refusal.code, RefusalCode::Unsupported);
        let refusal = edge
            .refusal(&serde_json::json!({"kind": "logs", "pod": 7}))
            .await;
        assert_eq!(refusal.code, RefusalCode::BadRequest);
    }

    #[tokio::test]
    async fn streams_over_the_cap_are_refused_until_one_ends() {
        let edge = Edge::start().await;
        let dir = crate::pods::spec::pod_paths(edge.dir.path(), "u-web")
            .log_dir
            .join("app");
        std::fs::create_dir_all(&dir).expect("log dir");
        std::fs::write(dir.join("0.log"), "2026-11-24T05:31:04.8Z stdout F one\n").expect("log");
        let follow = logs("web", "u-web", "app", true);
        let mut open = Vec::new();
        for _ in 0..MAX_STREAMS {
            let (reply, send, recv) = edge.open(&follow).await;
            assert_eq!(reply, StreamReply::Accepted);
            open.push((send, recv));
        }
        let refusal = edge.refusal(&follow).await;
        assert_eq!(refusal.code, RefusalCode::TooManyStreams);
        assert_eq!(
            refusal.message,
            "node gw-1 serves 128 streams already, the most it allows; close some and retry"
        );
        // The cloud stops reading one: the edge ends it and has room again.
        let (_send, mut recv) = open.pop().expect("one");
        recv.stop(quinn::VarInt::from_u32(0)).expect("stop");
        let freed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if edge.open(&follow).await.0 == StreamReply::Accepted {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(freed.is_ok(), "no slot came free");
    }

    #[tokio::test]
    async fn a_followed_log_ends_when_the_pod_leaves_the_store() {
        let mut edge = Edge::start().await;
        let dir = crate::pods::spec::pod_paths(edge.dir.path(), "u-web")
            .log_dir
            .join("app");
        std::fs::create_dir_all(&dir).expect("log dir");
        std::fs::write(dir.join("0.log"), "2026-11-24T05:31:04.8Z stdout F one\n").expect("log");
        let (reply, _send, mut recv) = edge.open(&logs("web", "u-web", "app", true)).await;
        assert_eq!(reply, StreamReply::Accepted);
        let mut first = [0u8; 4];
        recv.read_exact(&mut first).await.expect("first line");
        assert_eq!(&first, b"one\n");
        assert!(
            edge.metrics
                .render()
                .contains("edgecore_streams_open{kind=\"logs\"} 1")
        );
        // Still following: nothing ends the stream yet.
        let early = tokio::time::timeout(Duration::from_millis(400), recv.read_to_end(1024)).await;
        assert!(
            early.is_err(),
            "the followed log ended by itself: {early:?}"
        );
        edge.store
            .apply(&[StoreOp::Delete {
                key: ObjectKey::new("Pod", "default", "web"),
            }])
            .expect("delete");
        edge.changed.send_modify(|v| *v += 1);
        let rest = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024))
            .await
            .expect("the stream ends once the pod is gone")
            .expect("finished cleanly");
        assert!(rest.is_empty());
        // The gauge drops once the serving task has returned, just after the stream's end.
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while !edge
                .metrics
                .render()
                .contains("edgecore_streams_open{kind=\"logs\"} 0")
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "{}", edge.metrics.render());
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    #[test]
    fn container_names_come_from_the_spec() {
        let two = pod(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {
                "containers": [{"name": "app"}, {"name": "sidecar"}],
                "initContainers": [{"name": "setup"}],
            },
        }));
        assert_eq!(container_name(&two, "sidecar").expect("valid"), "sidecar");
        assert_eq!(container_name(&two, "setup").expect("valid"), "setup");
        let err = container_name(&two, "nope").unwrap_err();
        assert_eq!(err.code, RefusalCode::ContainerNotFound);
        assert_eq!(
            err.message,
            "container nope is not valid for pod web, choose one of: [app sidecar setup]"
        );
        let err = container_name(&two, "").unwrap_err();
        assert_eq!(err.code, RefusalCode::BadRequest);
        assert!(err.message.contains("must be specified"), "{}", err.message);
        let one = pod(serde_json::json!({
            "metadata": {"name": "solo"},
            "spec": {"containers": [{"name": "only"}]},
        }));
        assert_eq!(container_name(&one, "").expect("default"), "only");
    }
}
