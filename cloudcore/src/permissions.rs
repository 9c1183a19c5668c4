//! What cloudcore may do in a real cluster: the one list of API permissions it needs in kube
//! mode, checked at start with SelfSubjectAccessReviews so that missing RBAC is a clear error
//! naming the permission instead of a 403 somewhere later.
//!
//! `deploy/kubernetes/rbac.yaml` grants exactly this list; `cloudcore permissions` prints it,
//! and the kube-mode tests compare it with the RBAC the cluster holds after applying the file.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use serde::Serialize;

/// Namespace of node leases (see [`crate::nodes::LEASE_NAMESPACE`]).
const LEASES: &str = crate::nodes::LEASE_NAMESPACE;

/// One resource (or subresource) and the verbs cloudcore uses on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Permission {
    /// API group; empty for the core group.
    pub api_group: &'static str,
    /// Resource, with `/subresource` where it is one (`pods/status`).
    pub resource: &'static str,
    /// Verbs used.
    pub verbs: &'static [&'static str],
    /// The one namespace it is needed in; `None` for cluster-wide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'static str>,
    /// Which part of cloudcore uses it.
    pub used_by: &'static str,
}

/// Every permission cloudcore needs in kube mode, and nothing more.
pub const REQUIRED: &[Permission] = &[
    Permission {
        api_group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch", "create", "patch"],
        namespace: None,
        used_by: "nodes (the edge's Node), downstream (each edge's own Node), autonomy",
    },
    Permission {
        api_group: "",
        resource: "nodes/status",
        verbs: &["patch"],
        namespace: None,
        used_by: "nodes (Ready, nodeInfo), upstream (status the edge reports)",
    },
    Permission {
        api_group: "",
        resource: "pods",
        verbs: &["get", "list", "watch", "patch", "delete"],
        namespace: None,
        used_by: "downstream (pods bound to edges), upstream (uid checks, confirmed deletions), autonomy (tolerations)",
    },
    Permission {
        api_group: "",
        resource: "pods/status",
        verbs: &["patch"],
        namespace: None,
        used_by: "upstream (pod status the edge reports)",
    },
    Permission {
        api_group: "",
        resource: "namespaces",
        verbs: &["get"],
        namespace: None,
        used_by: "state (the API store's identity: the kube-system Namespace's uid)",
    },
    Permission {
        api_group: "",
        resource: "configmaps",
        verbs: &["list", "watch"],
        namespace: None,
        used_by: "downstream (ConfigMaps edge pods use), kubelet (the client CA in kube-system/extension-apiserver-authentication)",
    },
    Permission {
        api_group: "",
        resource: "secrets",
        verbs: &["list", "watch"],
        namespace: None,
        used_by: "downstream (Secrets edge pods use)",
    },
    Permission {
        api_group: "",
        resource: "services",
        verbs: &["list", "watch"],
        namespace: None,
        used_by: "downstream (every Service goes to every edge, for its proxy, DNS and pods' environment)",
    },
    Permission {
        api_group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
        namespace: None,
        used_by: "downstream (every EndpointSlice goes to every edge, for its DNS and selectorless Services)",
    },
    Permission {
        api_group: "",
        resource: "events",
        verbs: &["create", "patch"],
        namespace: None,
        used_by: "events (edges' kubelet events: created, and patched when they repeat)",
    },
    Permission {
        api_group: "",
        resource: "serviceaccounts/token",
        verbs: &["create"],
        namespace: None,
        used_by: "tokens (bound service-account tokens for edge pods' projected volumes)",
    },
    Permission {
        api_group: "authentication.k8s.io",
        resource: "tokenreviews",
        verbs: &["create"],
        namespace: None,
        used_by: "kubelet (bearer tokens of callers of edge nodes' kubelet API)",
    },
    Permission {
        api_group: "authorization.k8s.io",
        resource: "subjectaccessreviews",
        verbs: &["create"],
        namespace: None,
        used_by: "kubelet (may the caller use nodes/proxy, stats or metrics of this edge node)",
    },
    Permission {
        api_group: "devices.kubeedge.io",
        resource: "devices",
        verbs: &["get", "list", "watch"],
        namespace: None,
        used_by: "downstream (Devices bound to edges), upstream (uid checks before a status write)",
    },
    Permission {
        api_group: "devices.kubeedge.io",
        resource: "devices/status",
        verbs: &["patch"],
        namespace: None,
        used_by: "upstream (device twins and state the edge reports)",
    },
    Permission {
        api_group: "devices.kubeedge.io",
        resource: "devicemodels",
        verbs: &["list", "watch"],
        namespace: None,
        used_by: "downstream (DeviceModels of the Devices bound to edges)",
    },
    Permission {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "list", "create", "patch"],
        namespace: Some(LEASES),
        used_by: "nodes (each connected edge's Lease; at start, the unexpired ones listed and renewed once)",
    },
];

/// The shipped namespace of `--state=cluster` (deploy/kubernetes).
pub const STATE_NAMESPACE: &str = "edge-system";

/// What `--state=cluster` (several replicas) needs as well, in the state namespace
/// (`--state-namespace`, checked there at start; listed here with the shipped one):
/// deploy/kubernetes/rbac.yaml grants it with a Role in edge-system.
pub const CLUSTER_STATE: &[Permission] = &[
    Permission {
        api_group: "",
        resource: "secrets",
        verbs: &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
        namespace: Some(STATE_NAMESPACE),
        used_by: "registry::cluster (tokens, nodes, certificates, kubelet ports), pki (the CA Secret)",
    },
    Permission {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "list", "watch", "create", "update"],
        namespace: Some(STATE_NAMESPACE),
        used_by: "replicas' leader election (the singleton work's Lease)",
    },
];

/// Everything the shipped RBAC grants: [`REQUIRED`] and [`CLUSTER_STATE`].
pub fn all() -> Vec<Permission> {
    REQUIRED.iter().chain(CLUSTER_STATE).copied().collect()
}

/// A permission the credentials lack, as `VERB RESOURCE[ in NAMESPACE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub String);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn describe(permission: &Permission, verb: &str) -> String {
    let group = if permission.api_group.is_empty() {
        String::new()
    } else {
        format!(".{}", permission.api_group)
    };
    let (resource, sub) = match permission.resource.split_once('/') {
        Some((r, s)) => (r, format!("/{s}")),
        None => (permission.resource, String::new()),
    };
    match permission.namespace {
        Some(ns) => format!("{verb} {resource}{group}{sub} in namespace {ns}"),
        None => format!("{verb} {resource}{group}{sub}"),
    }
}

/// Asks the API server, once per verb, whether these credentials have every permission of
/// [`REQUIRED`]; returns the missing ones. An error means the reviews themselves failed.
pub async fn check(client: &kube::Client) -> Result<Vec<Missing>, kube::Error> {
    check_list(client, REQUIRED, None).await
}

/// [`CLUSTER_STATE`] in `namespace`; returns the missing ones.
pub async fn check_cluster_state(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<Missing>, kube::Error> {
    check_list(client, CLUSTER_STATE, Some(namespace)).await
}

async fn check_list(
    client: &kube::Client,
    permissions: &[Permission],
    namespace: Option<&str>,
) -> Result<Vec<Missing>, kube::Error> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for permission in permissions {
        let permission_namespace = namespace.or(permission.namespace);
        let (resource, subresource) = match permission.resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_string())),
            None => (permission.resource, None),
        };
        for verb in permission.verbs {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(permission.api_group.to_string()),
                        resource: Some(resource.to_string()),
                        subresource: subresource.clone(),
                        verb: Some(verb.to_string()),
                        namespace: permission_namespace.map(String::from),
                        ..ResourceAttributes::default()
                    }),
                    ..SelfSubjectAccessReviewSpec::default()
                },
                ..SelfSubjectAccessReview::default()
            };
            let answer = reviews.create(&PostParams::default(), &review).await?;
            if !answer.status.is_some_and(|s| s.allowed) {
                let mut permission = *permission;
                if let Some(ns) = namespace {
                    permission.namespace = None;
                    let mut text = describe(&permission, verb);
                    text.push_str(&format!(" in namespace {ns}"));
                    missing.push(Missing(text));
                } else {
                    missing.push(Missing(describe(&permission, verb)));
                }
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_permissions_read_like_kubectl_auth_can_i() {
        assert_eq!(describe(&REQUIRED[3], "patch"), "patch pods/status");
        let lease = REQUIRED
            .iter()
            .find(|p| p.resource == "leases")
            .expect("leases");
        assert_eq!(
            describe(lease, "create"),
            "create leases.coordination.k8s.io in namespace kube-node-lease"
        );
    }

    #[test]
    fn every_permission_names_verbs_once() {
        for permission in REQUIRED {
            let mut verbs = permission.verbs.to_vec();
            verbs.sort_unstable();
            verbs.dedup();
            assert_eq!(verbs.len(), permission.verbs.len(), "{permission:?}");
            assert!(!permission.used_by.is_empty());
        }
    }
}
