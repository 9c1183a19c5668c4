//! Streams the cloud opens on this edge's session connection ([`proto::stream`]): the edge
//! checks that the pod is its own (name and uid, in its store and its runtime), then serves
//! logs from the container log files, exec/attach/port-forward through the CRI streaming
//! server ([`remote`]) and resource stats.
//!
//! INTERFACE SKELETON (issue 13): the signatures are fixed; the bodies are being written.

pub mod remote;
