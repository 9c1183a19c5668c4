//! Request paths to targets: discovery documents, or a resource collection/item/subresource.

use super::metrics_api::{self, MetricsRequest};
use super::resources::{self, ResourceInfo};
use super::status::ApiError;
use super::streaming::{PodStreamRequest, PodSubresource};

/// What a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Version,
    Health(daemon::health::Endpoint),
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/{group}`
    Group(String),
    /// `/api/v1`, `/apis/{group}/{version}`
    ResourceList {
        group: String,
        version: String,
    },
    OpenApiV3Index,
    /// `/openapi/v3/{api/v1 | apis/g/v}`
    OpenApiV3 {
        group: String,
        version: String,
    },
    OpenApiV2,
    Resource(ResourceRequest),
    /// `pods/{log,exec,attach,portforward}`: served by [`super::streaming`] on the whole request.
    PodStream(PodStreamRequest),
    /// `/apis/metrics.k8s.io/v1beta1/...`: node and pod usage from the edges.
    Metrics(MetricsRequest),
}

/// A request for objects of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRequest {
    pub info: &'static ResourceInfo,
    /// The namespace in the path; `None` for cluster-scoped resources and all-namespace lists.
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// Parses a request path.
pub fn route(path: &str) -> Result<Target, ApiError> {
    let trimmed = path.trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').filter(|s| !s.is_empty()).collect();
    let not_found = || ApiError::no_route(path);
    match segments.as_slice() {
        ["version"] => Ok(Target::Version),
        ["healthz"] => Ok(Target::Health(daemon::health::Endpoint::Healthz)),
        ["livez"] => Ok(Target::Health(daemon::health::Endpoint::Livez)),
        ["readyz"] => Ok(Target::Health(daemon::health::Endpoint::Readyz)),
        ["api"] => Ok(Target::CoreVersions),
        ["apis"] => Ok(Target::Groups),
        ["apis", group] => Ok(Target::Group(group.to_string())),
        ["openapi", "v3"] => Ok(Target::OpenApiV3Index),
        ["openapi", "v3", "api", version] => Ok(Target::OpenApiV3 {
            group: String::new(),
            version: version.to_string(),
        }),
        ["openapi", "v3", "apis", group, version] => Ok(Target::OpenApiV3 {
            group: group.to_string(),
            version: version.to_string(),
        }),
        ["openapi", "v2"] => Ok(Target::OpenApiV2),
        ["apis", metrics_api::GROUP, metrics_api::VERSION, rest @ ..] if !rest.is_empty() => {
            metrics_api::route(rest)
                .map(Target::Metrics)
                .ok_or_else(not_found)
        }
        ["api", version, rest @ ..] => resource_target("", version, rest).ok_or_else(not_found),
        ["apis", group, version, rest @ ..] => {
            resource_target(group, version, rest).ok_or_else(not_found)
        }
        _ => Err(not_found()),
    }
}

fn resource_target(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let lookup = |plural: &str| resources::lookup(group, version, plural);
    let request = |info, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Target::Resource(ResourceRequest {
            info,
            namespace: namespace.map(String::from),
            name: name.map(String::from),
            subresource: sub.map(String::from),
        }))
    };
    match rest {
        [] => Some(Target::ResourceList {
            group: group.to_string(),
            version: version.to_string(),
        }),
        // Namespaced collections and items: /namespaces/{ns}/{plural}[/{name}[/{sub}]]
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|i| i.namespaced) => {
            let info = lookup(plural)?;
            match tail {
                [] => request(info, Some(ns), None, None),
                [name] => request(info, Some(ns), Some(name), None),
                [name, sub] if group.is_empty() && info.plural == "pods" => {
                    match PodSubresource::parse(sub) {
                        Some(subresource) => Some(Target::PodStream(PodStreamRequest {
                            namespace: ns.to_string(),
                            name: name.to_string(),
                            subresource,
                        })),
                        None if info.subresources.contains(sub) => {
                            request(info, Some(ns), Some(name), Some(sub))
                        }
                        None => None,
                    }
                }
                [name, sub] if info.subresources.contains(sub) => {
                    request(info, Some(ns), Some(name), Some(sub))
                }
                _ => None,
            }
        }
        [plural, tail @ ..] => {
            let info = lookup(plural)?;
            match tail {
                // All-namespace list of a namespaced resource.
                [] => request(info, None, None, None),
                [name] if !info.namespaced => request(info, None, Some(name), None),
                [name, sub] if !info.namespaced && info.subresources.contains(sub) => {
                    request(info, None, Some(name), Some(sub))
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> ResourceRequest {
        match route(path) {
            Ok(Target::Resource(r)) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn resource_paths() {
        let r = resource("/api/v1/namespaces/default/pods");
        assert_eq!(
            (r.info.plural, r.namespace.as_deref(), r.name.as_deref()),
            ("pods", Some("default"), None)
        );
        let r = resource("/api/v1/namespaces/default/pods/web/status");
        assert_eq!(
            (r.name.as_deref(), r.subresource.as_deref()),
            (Some("web"), Some("status"))
        );
        let r = resource("/api/v1/pods");
        assert_eq!((r.info.plural, r.namespace.as_deref()), ("pods", None));
        let r = resource("/api/v1/nodes/gw-1/status");
        assert_eq!(
            (r.info.plural, r.name.as_deref(), r.subresource.as_deref()),
            ("nodes", Some("gw-1"), Some("status"))
        );
        let r = resource("/api/v1/namespaces/kube-system");
        assert_eq!(
            (r.info.plural, r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let r = resource("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/gw-1");
        assert_eq!((r.info.plural, r.name.as_deref()), ("leases", Some("gw-1")));
    }

    #[test]
    fn pod_stream_and_metrics_paths() {
        for (sub, want) in [
            ("log", PodSubresource::Log),
            ("exec", PodSubresource::Exec),
            ("attach", PodSubresource::Attach),
            ("portforward", PodSubresource::PortForward),
        ] {
            let path = format!("/api/v1/namespaces/ns1/pods/web/{sub}");
            assert_eq!(
                route(&path).ok(),
                Some(Target::PodStream(PodStreamRequest {
                    namespace: "ns1".into(),
                    name: "web".into(),
                    subresource: want,
                })),
                "{path}"
            );
        }
        assert!(matches!(
            route("/api/v1/namespaces/ns1/pods/web/status"),
            Ok(Target::Resource(_))
        ));
        assert!(matches!(
            route("/apis/metrics.k8s.io/v1beta1/namespaces/ns1/pods/web"),
            Ok(Target::Metrics(_))
        ));
        assert!(matches!(
            route("/apis/metrics.k8s.io/v1beta1"),
            Ok(Target::ResourceList { .. })
        ));
        assert!(route("/apis/metrics.k8s.io/v1beta1/widgets").is_err());
        assert!(route("/api/v1/nodes/gw-1/log").is_err());
    }

    #[test]
    fn discovery_paths() {
        assert_eq!(route("/api").ok(), Some(Target::CoreVersions));
        assert_eq!(route("/apis/").ok(), Some(Target::Groups));
        assert_eq!(
            route("/api/v1").ok(),
            Some(Target::ResourceList {
                group: String::new(),
                version: "v1".into()
            })
        );
        assert_eq!(route("/version").ok(), Some(Target::Version));
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for path in [
            "/api/v1/widgets",
            "/api/v1/namespaces/default/widgets",
            "/api/v1/namespaces/default/pods/web/exec-nope",
            "/api/v1/nodes/gw-1/unknown",
            "/nothing",
        ] {
            let e = route(path).expect_err(path);
            assert_eq!(e.code, axum::http::StatusCode::NOT_FOUND, "{path}");
        }
    }
}
