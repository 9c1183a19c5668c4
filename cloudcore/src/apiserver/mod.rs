//! The embedded control plane: a Kubernetes-compatible API served by cloudcore on SQLite, so
//! `kubectl` and kube-rs work against a single machine with no cluster.
//!
//! - [`store`]: objects and watch events in `DIR/api.db`, resourceVersion, watch fan-out.
//! - [`patch`]: JSON patch, JSON merge patch and strategic merge patch.
//! - [`resources`]: the resource table (kinds, scopes, subresources) and field selectors.
//! - [`discovery`]: `/api`, `/apis`, resource lists and the OpenAPI documents kubectl reads.

pub mod discovery;
pub mod patch;
pub mod resources;
pub mod store;
