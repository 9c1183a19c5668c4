//! Streams to edge pods over the tunnel: the one place that opens a QUIC stream on an edge's
//! session connection for `kubectl logs`, `exec`, `attach`, `port-forward` and for resource
//! stats ([docs/streams.md](../../docs/streams.md), wire format in [`proto::stream`]).
//!
//! The front-ends (the embedded API's `pods/log|exec|attach|portforward` and `metrics.k8s.io`,
//! the kubelet endpoint of kube mode) resolve a pod with [`Streams::locate`] and open a stream
//! with [`Streams::open`]; they never touch a connection themselves. The hub tells `Streams`
//! when a node's session starts and ends.
//!
//! Node scoping: a stream is opened only on the connection of the node the pod is bound to (the
//! downstream index says which, with the pod's uid), and the edge checks name, uid and
//! `spec.nodeName` again on its side. Nothing here waits for a node to reconnect: a node
//! without a live session is an error at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use proto::ProtocolVersion;
use proto::stream::{PodTarget, Refusal, RefusalCode, StreamReply, StreamRequest, stats};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::downstream::Downstream;
use crate::metrics::Metrics;

/// Concurrent streams per edge unless `--max-streams-per-edge` says otherwise.
pub const DEFAULT_MAX_STREAMS_PER_EDGE: usize = 128;
/// How long the edge may take to answer a stream's request (or to send its stats).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply header read from an edge; a stats summary is the largest (a few KiB per pod).
const MAX_REPLY: usize = proto::stream::MAX_HEADER_SIZE;

/// Why a stream could not be opened. `Display` is the message kubectl shows; it names the node
/// (and since when it is disconnected) where that is the cause.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("pods \"{name}\" not found in namespace \"{namespace}\"")]
    PodNotFound { namespace: String, name: String },
    #[error("pod {namespace}/{name} is not bound to a node yet")]
    NotScheduled { namespace: String, name: String },
    #[error("pod {namespace}/{name} is bound to node {node}, not an edge node of this cloudcore")]
    NotEdge {
        namespace: String,
        name: String,
        node: String,
    },
    #[error("{}", disconnected_message(.node, .since))]
    Disconnected {
        node: String,
        /// When its last session ended, if this cloudcore saw one.
        since: Option<SystemTime>,
    },
    #[error(
        "node {node} runs edgecore speaking protocol {version}, which has no streams (needs 1.{})",
        proto::stream::STREAMS_SINCE_MINOR
    )]
    EdgeTooOld { node: String, version: String },
    #[error("node {node} has {limit} streams open, the most allowed; close some and retry")]
    TooManyStreams { node: String, limit: usize },
    #[error("node {node}: {}", .refusal.message)]
    Refused { node: String, refusal: Refusal },
    #[error("stream to node {node} failed: {message}")]
    Transport { node: String, message: String },
}

fn disconnected_message(node: &str, since: &Option<SystemTime>) -> String {
    match since {
        Some(t) => format!(
            "node {node} is disconnected from cloudcore since {}",
            humantime::format_rfc3339_seconds(*t)
        ),
        None => format!("node {node} is not connected to cloudcore"),
    }
}

impl OpenError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::PodNotFound { .. } => "pod_not_found",
            OpenError::NotScheduled { .. } => "not_scheduled",
            OpenError::NotEdge { .. } => "not_edge",
            OpenError::Disconnected { .. } => "disconnected",
            OpenError::EdgeTooOld { .. } => "edge_too_old",
            OpenError::TooManyStreams { .. } => "too_many_streams",
            OpenError::Refused { .. } => "refused",
            OpenError::Transport { .. } => "transport",
        }
    }

    /// The HTTP status the front-ends answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            OpenError::PodNotFound { .. } => 404,
            OpenError::NotScheduled { .. } | OpenError::NotEdge { .. } => 400,
            OpenError::Disconnected { .. } | OpenError::EdgeTooOld { .. } => 503,
            OpenError::TooManyStreams { .. } => 429,
            OpenError::Refused { refusal, .. } => match refusal.code {
                RefusalCode::PodNotFound => 404,
                RefusalCode::ContainerNotFound
                | RefusalCode::ContainerNotRunning
                | RefusalCode::BadRequest => 400,
                RefusalCode::TooManyStreams => 429,
                RefusalCode::Runtime => 500,
                RefusalCode::Unsupported => 501,
            },
            OpenError::Transport { .. } => 502,
        }
    }
}

/// An accepted stream: after the edge's `Accepted`, the payload of its kind flows on `send`
/// and `recv`. Dropping it releases its slot in the edge's stream cap; a front-end that takes
/// `send` and `recv` apart keeps the slot on the reader with [`TunnelStream::into_io`].
#[derive(Debug)]
pub struct TunnelStream {
    pub node: String,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    slot: StreamSlot,
}

impl TunnelStream {
    /// The two halves, with the slot riding on the reader: the stream counts against the
    /// edge's cap until the reader is dropped (the front-ends drop it when the session ends).
    pub fn into_io(self) -> (quinn::SendStream, Slotted<quinn::RecvStream>) {
        (
            self.send,
            Slotted {
                inner: self.recv,
                _slot: self.slot,
            },
        )
    }

    /// [`TunnelStream::into_io`], boxed as the `streaming` crate takes a tunnel.
    pub fn into_boxed(self) -> (streaming::BoxWrite, streaming::BoxRead) {
        let (send, recv) = self.into_io();
        (Box::pin(send), Box::pin(recv))
    }
}

/// A reader that holds its stream's [`StreamSlot`] until it is dropped.
#[derive(Debug)]
pub struct Slotted<R> {
    inner: R,
    _slot: StreamSlot,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Slotted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// A stream's place in its edge's cap and in `cloudcore_streams_open`; released on drop.
#[derive(Debug)]
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    open: Option<Gauge>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(gauge) = &self.open {
            gauge.dec();
        }
    }
}

/// A node's live session, as the hub reported it.
#[derive(Debug)]
struct Session {
    id: u64,
    connection: quinn::Connection,
    version: ProtocolVersion,
}

/// What the hub told us about nodes' sessions.
#[derive(Debug, Default)]
struct Sessions {
    live: HashMap<String, Session>,
    /// When each node's last session ended (while it has no live one).
    ended: HashMap<String, SystemTime>,
}

/// What `Streams` needs from parts built after it (`lib.rs` creates `Streams` first, for the
/// embedded API).
#[derive(Debug)]
struct Parts {
    downstream: Arc<Downstream>,
    metrics: Arc<Metrics>,
}

/// The cloud's side of edge streams: which node has which live connection, the per-edge cap,
/// and where each pod runs.
#[derive(Debug)]
pub struct Streams {
    max_per_edge: usize,
    /// A std mutex: held for a map lookup or update, never across an await.
    sessions: Mutex<Sessions>,
    /// One semaphore per node that ever had a stream; its permits live in `TunnelStream`s.
    /// Same locking rule.
    caps: Mutex<HashMap<String, Arc<Semaphore>>>,
    parts: OnceLock<Parts>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            max_per_edge: DEFAULT_MAX_STREAMS_PER_EDGE,
            sessions: Mutex::default(),
            caps: Mutex::default(),
            parts: OnceLock::new(),
        }
    }
}

impl Streams {
    pub fn new(max_per_edge: usize) -> Arc<Streams> {
        Arc::new(Streams {
            max_per_edge,
            ..Streams::default()
        })
    }

    /// Hands over the pod index and the metrics once they exist; later calls are ignored.
    pub fn attach(&self, downstream: Arc<Downstream>, metrics: Arc<Metrics>) {
        let _ = self.parts.set(Parts {
            downstream,
            metrics,
        });
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hub installed session `session` of `node` on `connection`; the edge speaks `version`.
    pub fn connected(
        &self,
        node: &str,
        session: u64,
        connection: quinn::Connection,
        version: ProtocolVersion,
    ) {
        let mut sessions = self.sessions();
        sessions.ended.remove(node);
        sessions.live.insert(
            node.to_string(),
            Session {
                id: session,
                connection,
                version,
            },
        );
    }

    /// Session `session` of `node` ended. A stale id (a session already replaced by a newer
    /// one) changes nothing.
    pub fn disconnected(&self, node: &str, session: u64) {
        let mut sessions = self.sessions();
        if sessions.live.get(node).is_some_and(|s| s.id == session) {
            sessions.live.remove(node);
            sessions.ended.insert(node.to_string(), SystemTime::now());
        }
    }

    /// The pod `namespace/name`: the node it is bound to and its uid, from the index of pods
    /// bound to edge nodes.
    pub fn locate(&self, namespace: &str, name: &str) -> Result<(String, PodTarget), OpenError> {
        let not_found = || OpenError::PodNotFound {
            namespace: namespace.into(),
            name: name.into(),
        };
        // Before the index exists (the first moments of a start) no pod can be found.
        let parts = self.parts.get().ok_or_else(not_found)?;
        // The index holds pods bound to a node only; an unscheduled pod is not found either.
        let location = parts
            .downstream
            .pod_location(namespace, name)
            .ok_or_else(not_found)?;
        if !location.edge {
            return Err(OpenError::NotEdge {
                namespace: namespace.into(),
                name: name.into(),
                node: location.node,
            });
        }
        Ok((
            location.node,
            PodTarget {
                namespace: namespace.into(),
                name: name.into(),
                uid: location.uid,
            },
        ))
    }

    /// Opens `request` on `node`'s connection, after checking that the pod it names is bound
    /// to `node` with that uid. Fails within a second when the node is not connected.
    pub async fn open(
        &self,
        node: &str,
        request: StreamRequest,
    ) -> Result<TunnelStream, OpenError> {
        let kind = request.kind();
        let result = self.open_checked(node, request).await;
        if let Some(parts) = self.parts.get() {
            let outcome = match &result {
                Ok(_) => "accepted",
                Err(e) => e.reason(),
            };
            parts.metrics.streams.outcome(kind, outcome);
        }
        match &result {
            Ok(_) => tracing::debug!(node.name = %node, kind, "stream opened"),
            Err(e) => {
                tracing::debug!(node.name = %node, kind, reason = e.reason(), "stream not opened: {e}")
            }
        }
        result
    }

    async fn open_checked(
        &self,
        node: &str,
        request: StreamRequest,
    ) -> Result<TunnelStream, OpenError> {
        if let Some(pod) = request.pod() {
            self.check_bound(node, pod)?;
        }
        let connection = self.live_connection(node)?;
        let permit = self
            .cap(node)
            .try_acquire_owned()
            .map_err(|_| OpenError::TooManyStreams {
                node: node.into(),
                limit: self.max_per_edge,
            })?;
        let transport = |message: String| OpenError::Transport {
            node: node.into(),
            message,
        };
        let opened = tokio::time::timeout(REPLY_TIMEOUT, async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| transport(format!("cannot open a stream: {e}")))?;
            proto::stream::write_header(&mut send, &request)
                .await
                .map_err(|e| transport(format!("cannot send the request: {e}")))?;
            let reply: StreamReply = proto::stream::read_header(&mut recv, MAX_REPLY)
                .await
                .map_err(|e| transport(format!("no answer to the request: {e}")))?;
            Ok::<_, OpenError>((send, recv, reply))
        })
        .await;
        let (send, recv, reply) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                // The session may have ended meanwhile: say so rather than a stream error.
                if connection.close_reason().is_some() {
                    return Err(self.disconnected_error(node));
                }
                return Err(e);
            }
            Err(_) => {
                return Err(transport(format!(
                    "the edge did not answer within {} s",
                    REPLY_TIMEOUT.as_secs()
                )));
            }
        };
        match reply {
            StreamReply::Accepted => {}
            StreamReply::Refused(refusal) => {
                return Err(OpenError::Refused {
                    node: node.into(),
                    refusal,
                });
            }
        }
        let open = self
            .parts
            .get()
            .map(|p| p.metrics.streams.open(request.kind()));
        if let Some(gauge) = &open {
            gauge.inc();
        }
        Ok(TunnelStream {
            node: node.into(),
            send,
            recv,
            slot: StreamSlot {
                _permit: permit,
                open,
            },
        })
    }

    /// The node's current usage (a stats stream).
    pub async fn stats(&self, node: &str) -> Result<stats::Summary, OpenError> {
        let mut stream = self.open(node, StreamRequest::Stats).await?;
        let transport = |message: String| OpenError::Transport {
            node: node.into(),
            message,
        };
        let _ = stream.send.finish();
        match tokio::time::timeout(
            REPLY_TIMEOUT,
            proto::stream::read_header(&mut stream.recv, MAX_REPLY),
        )
        .await
        {
            Ok(Ok(summary)) => Ok(summary),
            Ok(Err(e)) => Err(transport(format!("cannot read the stats: {e}"))),
            Err(_) => Err(transport(format!(
                "the edge sent no stats within {} s",
                REPLY_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The pod the request names must be bound to `node` with that uid.
    fn check_bound(&self, node: &str, pod: &PodTarget) -> Result<(), OpenError> {
        let bound = self
            .parts
            .get()
            .and_then(|p| p.downstream.pod_location(&pod.namespace, &pod.name))
            .is_some_and(|l| l.node == node && l.uid == pod.uid && !pod.uid.is_empty());
        if bound {
            Ok(())
        } else {
            Err(OpenError::PodNotFound {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })
        }
    }

    /// Whether `node` has a live session whose edge speaks streams, with the error `open` would
    /// give if not; no IO. For front-ends that must answer before they know what to open
    /// (a SPDY port-forward learns its ports only after the upgrade).
    pub fn check_live(&self, node: &str) -> Result<(), OpenError> {
        self.live_connection(node).map(|_| ())
    }

    /// The node's live connection, if its edge speaks streams.
    fn live_connection(&self, node: &str) -> Result<quinn::Connection, OpenError> {
        let sessions = self.sessions();
        let Some(session) = sessions.live.get(node) else {
            return Err(OpenError::Disconnected {
                node: node.into(),
                since: sessions.ended.get(node).copied(),
            });
        };
        if !session.version.has_streams() {
            return Err(OpenError::EdgeTooOld {
                node: node.into(),
                version: session.version.to_string(),
            });
        }
        Ok(session.connection.clone())
    }

    fn disconnected_error(&self, node: &str) -> OpenError {
        let sessions = self.sessions();
        OpenError::Disconnected {
            node: node.into(),
            since: sessions
                .ended
                .get(node)
                .copied()
                .or(Some(SystemTime::now())),
        }
    }

    fn cap(&self, node: &str) -> Arc<Semaphore> {
        self.caps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_edge)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use k8s_openapi::api::core::v1::{Node, Pod};
    use proto::stream::{LogsRequest, write_header};

    use super::*;
    use crate::downstream::DownstreamConfig;

    const STREAMS: ProtocolVersion = proto::PROTOCOL_VERSION;
    const OLD: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };

    /// A real QUIC connection over loopback: the first is the side `Streams` opens streams on,
    /// the second the peer (an edge stand-in). The endpoints must be kept alive.
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
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic"),
        ));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(64u32.into());
        server_config.transport_config(Arc::new(transport));
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
            .expect("server");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic"),
        )));
        let connecting = client
            .connect(server.local_addr().expect("addr"), "localhost")
            .expect("connect");
        let accepting = async { server.accept().await.expect("incoming").await };
        let (accepted, connected) = tokio::join!(accepting, connecting);
        let peer = accepted.expect("accepted");
        (connected.expect("connected"), peer, (server, client))
    }

    /// A stand-in for an edge (no pods, no store): answers every stream with `reply` and keeps
    /// the stream open until the cloud ends it.
    fn fake_edge(peer: quinn::Connection, reply: StreamReply) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = peer.accept_bi().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let _: StreamRequest = proto::stream::read_header(&mut recv, 1 << 16)
                        .await
                        .expect("request");
                    write_header(&mut send, &reply).await.expect("reply");
                    let _ = send.stopped().await;
                });
            }
        })
    }

    fn with_index(streams: &Streams) -> Arc<Downstream> {
        let metrics = Arc::new(Metrics::default());
        let downstream = Arc::new(Downstream::new(
            DownstreamConfig::default(),
            metrics.clone(),
        ));
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gw-1", "uid": "n1", "resourceVersion": "1",
                         "labels": {"node-role.kubernetes.io/edge": ""}},
        }))
        .expect("node");
        let pod = |name: &str, uid: &str, node: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": "2"},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
            }))
            .expect("pod")
        };
        downstream.update(|index| {
            index.apply_node(&node);
            index.apply_pod(&pod("web", "u-web", "gw-1"));
            index.apply_pod(&pod("elsewhere", "u-else", "worker-1"));
        });
        streams.attach(downstream.clone(), metrics);
        downstream
    }

    fn logs(name: &str, uid: &str) -> StreamRequest {
        StreamRequest::Logs(LogsRequest {
            pod: PodTarget {
                namespace: "default".into(),
                name: name.into(),
                uid: uid.into(),
            },
            container: "c".into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_node_without_a_session_fails_at_once_naming_it_and_since_when() {
        let streams = Streams::new(4);
        let started = Instant::now();
        let err = streams.stats("gw-1").await.unwrap_err();
        assert!(
            matches!(err, OpenError::Disconnected { since: None, .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "node gw-1 is not connected to cloudcore");
        assert_eq!(err.http_status(), 503);

        let (connection, peer, _endpoints) = quic_pair().await;
        let _edge = fake_edge(peer, StreamReply::Accepted);
        streams.connected("gw-1", 7, connection.clone(), STREAMS);
        // A replaced session ending later changes nothing.
        streams.disconnected("gw-1", 6);
        assert!(streams.stats_stream_opens("gw-1").await);
        streams.disconnected("gw-1", 7);
        let err = streams.stats("gw-1").await.unwrap_err();
        let OpenError::Disconnected { since: Some(_), .. } = &err else {
            panic!("{err:?}");
        };
        assert!(
            err.to_string()
                .starts_with("node gw-1 is disconnected from cloudcore since 20"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    impl Streams {
        /// Whether a stats stream opens (its reply is Accepted) on `node`.
        async fn stats_stream_opens(&self, node: &str) -> bool {
            self.open(node, StreamRequest::Stats).await.is_ok()
        }
    }

    #[tokio::test]
    async fn stats_reads_the_summary_the_edge_sends_after_accepting() {
        let streams = Streams::new(4);
        let (connection, peer, _endpoints) = quic_pair().await;
        let summary = stats::Summary {
            node: stats::NodeUsage {
                node_name: "gw-1".into(),
                memory: stats::Memory {
                    working_set_bytes: 42,
                    ..Default::default()
                },
                ..Default::default()
            },
            pods: Vec::new(),
        };
        // A stand-in edge: a stats stream gets `Accepted`, then the summary, then the end.
        let sent = summary.clone();
        tokio::spawn(async move {
            let (mut send, mut recv) = peer.accept_bi().await.expect("stream");
            let request: StreamRequest = proto::stream::read_header(&mut recv, 1 << 16)
                .await
                .expect("request");
            assert_eq!(request, StreamRequest::Stats);
            write_header(&mut send, &StreamReply::Accepted)
                .await
                .expect("reply");
            write_header(&mut send, &sent).await.expect("summary");
            send.finish().expect("finish");
            let _ = send.stopped().await;
        });
        streams.connected("gw-1", 1, connection, STREAMS);
        assert_eq!(streams.stats("gw-1").await.expect("stats"), summary);
    }

    #[tokio::test]
    async fn the_cap_counts_open_streams_and_frees_a_slot_when_one_is_dropped() {
        let streams = Streams::new(2);
        let metrics = Arc::new(Metrics::default());
        streams.attach(
            Arc::new(Downstream::new(
                DownstreamConfig::default(),
                metrics.clone(),
            )),
            metrics.clone(),
        );
        let (connection, peer, _endpoints) = quic_pair().await;
        let _edge = fake_edge(peer, StreamReply::Accepted);
        streams.connected("gw-1", 1, connection, STREAMS);
        let first = streams
            .open("gw-1", StreamRequest::Stats)
            .await
            .expect("first");
        let second = streams
            .open("gw-1", StreamRequest::Stats)
            .await
            .expect("second");
        let err = streams
            .open("gw-1", StreamRequest::Stats)
            .await
            .unwrap_err();
        assert!(
            matches!(err, OpenError::TooManyStreams { limit: 2, .. }),
            "{err:?}"
        );
        assert_eq!(err.http_status(), 429);
        let text = metrics.render();
        assert!(
            text.contains("cloudcore_streams_open{kind=\"stats\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("cloudcore_streams_total{kind=\"stats\",outcome=\"too_many_streams\"} 1"),
            "{text}"
        );
        drop(first);
        // A slot riding on the reader of a stream taken apart still counts.
        let (_send, slot) = second.into_io();
        let third = streams
            .open("gw-1", StreamRequest::Stats)
            .await
            .expect("a freed slot");
        assert!(streams.open("gw-1", StreamRequest::Stats).await.is_err());
        drop((third, slot));
        streams
            .open("gw-1", StreamRequest::Stats)
            .await
            .expect("both freed");
        assert!(
            metrics
                .render()
                .contains("cloudcore_streams_total{kind=\"stats\",outcome=\"accepted\"} 4")
        );
    }

    #[tokio::test]
    async fn an_old_edge_and_an_edge_refusal_are_errors_with_their_status() {
        let streams = Streams::new(4);
        let (connection, peer, _endpoints) = quic_pair().await;
        let refusal = Refusal {
            code: RefusalCode::PodNotFound,
            message: "pod default/web (uid u-web) does not run on node gw-1".into(),
        };
        let _edge = fake_edge(peer, StreamReply::Refused(refusal.clone()));
        streams.connected("gw-1", 1, connection.clone(), OLD);
        let err = streams.stats("gw-1").await.unwrap_err();
        assert!(matches!(err, OpenError::EdgeTooOld { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "node gw-1 runs edgecore speaking protocol 1.2, which has no streams (needs 1.3)"
        );
        streams.connected("gw-1", 2, connection, STREAMS);
        let err = streams.stats("gw-1").await.unwrap_err();
        let OpenError::Refused { refusal: got, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*got, refusal);
        assert_eq!(err.http_status(), 404);
        assert_eq!(
            err.to_string(),
            "node gw-1: pod default/web (uid u-web) does not run on node gw-1"
        );
    }

    #[tokio::test]
    async fn streams_go_only_to_the_node_the_pod_is_bound_to_with_its_uid() {
        let streams = Streams::new(4);
        // Before the index exists nothing is found.
        assert!(matches!(
            streams.locate("default", "web"),
            Err(OpenError::PodNotFound { .. })
        ));
        let _downstream = with_index(&streams);
        let (node, target) = streams.locate("default", "web").expect("located");
        assert_eq!(node, "gw-1");
        assert_eq!(target.uid, "u-web");
        let err = streams.locate("default", "elsewhere").unwrap_err();
        assert!(matches!(err, OpenError::NotEdge { .. }), "{err:?}");
        assert_eq!(err.http_status(), 400);
        let err = streams.locate("default", "nope").unwrap_err();
        assert_eq!(
            err.to_string(),
            "pods \"nope\" not found in namespace \"default\""
        );

        let (connection, peer, _endpoints) = quic_pair().await;
        let _edge = fake_edge(peer, StreamReply::Accepted);
        streams.connected("gw-1", 1, connection.clone(), STREAMS);
        streams.connected("gw-2", 2, connection, STREAMS);
        streams
            .open("gw-1", logs("web", "u-web"))
            .await
            .expect("bound here");
        for (node, request) in [
            // Another node's connection, a stale uid, no uid, an unknown pod.
            ("gw-2", logs("web", "u-web")),
            ("gw-1", logs("web", "u-old")),
            ("gw-1", logs("web", "")),
            ("gw-1", logs("nope", "u-web")),
        ] {
            let err = streams.open(node, request.clone()).await.unwrap_err();
            assert!(
                matches!(err, OpenError::PodNotFound { .. }),
                "{node} {request:?}: {err:?}"
            );
        }
    }
}
