//! Streams to edge pods over the tunnel: the one place that opens a QUIC stream on an edge's
//! session connection for `kubectl logs`, `exec`, `attach`, `port-forward` and for resource
//! stats ([docs/streams.md](../../docs/streams.md), wire format in [`proto::stream`]).
//!
//! The front-ends (the embedded API's `pods/log|exec|attach|portforward` and `metrics.k8s.io`,
//! the kubelet endpoint of kube mode) resolve a pod with [`Streams::locate`] and open a stream
//! with [`Streams::open`]; they never touch a connection themselves. The hub tells `Streams`
//! when a node's session starts and ends.
//!
//! INTERFACE SKELETON (issue 13): the signatures are fixed; the bodies are being written.

use std::sync::Arc;
use std::time::SystemTime;

use proto::stream::{PodTarget, Refusal, RefusalCode, StreamRequest, stats};

/// Concurrent streams per edge unless `--max-streams-per-edge` says otherwise.
pub const DEFAULT_MAX_STREAMS_PER_EDGE: usize = 128;

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
/// and `recv`. Dropping it releases its slot in the edge's stream cap.
#[derive(Debug)]
pub struct TunnelStream {
    pub node: String,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// The cloud's side of edge streams: which node has which live connection, the per-edge cap,
/// and where each pod runs.
#[derive(Debug, Default)]
pub struct Streams {}

impl Streams {
    pub fn new(max_per_edge: usize) -> Arc<Streams> {
        let _ = max_per_edge;
        Arc::new(Streams {})
    }

    /// The pod `namespace/name`: the node it is bound to and its uid, from the index of pods
    /// bound to edge nodes.
    pub fn locate(&self, namespace: &str, name: &str) -> Result<(String, PodTarget), OpenError> {
        Err(OpenError::PodNotFound {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// Opens `request` on `node`'s connection, after checking that the pod it names is bound
    /// to `node` with that uid. Fails within a second when the node is not connected.
    pub async fn open(
        &self,
        node: &str,
        request: StreamRequest,
    ) -> Result<TunnelStream, OpenError> {
        let _ = request;
        Err(OpenError::Disconnected {
            node: node.into(),
            since: None,
        })
    }

    /// The node's current usage (a stats stream).
    pub async fn stats(&self, node: &str) -> Result<stats::Summary, OpenError> {
        Err(OpenError::Disconnected {
            node: node.into(),
            since: None,
        })
    }
}
