//! Service-account tokens for edge pods: the node-scoped check of an edge's `TokenRequest` and
//! the call to the Kubernetes TokenRequest API that answers it.
//!
//! An edge asks for a token for one projected `serviceAccountToken` source of one pod. The
//! kubelet would ask the API server itself, where the Node authorizer and NodeRestriction
//! limit it to pods bound to its node; here cloudcore asks with its own ServiceAccount, so
//! cloudcore is the one that enforces the node scope ([`authorize`]): the pod must be bound to
//! the asking node with that uid, run as that service account, and its spec must ask for a
//! token with that audience and lifetime. The token is then bound to the pod (a
//! `boundObjectRef` with its uid), so the API server invalidates it when the pod goes.
//!
//! The embedded control plane has no ServiceAccounts and no TokenRequest: [`Issuer::Embedded`]
//! answers every request with [`ErrorCode::NotSupported`].

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest as ApiTokenRequest, TokenRequestSpec,
};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use proto::{ErrorCode, ErrorMessage, IssuedToken, TokenRequest};

/// The service account of a pod that does not name one.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// `expirationSeconds` of a projected token source that does not set it.
pub const DEFAULT_EXPIRATION_SECONDS: u64 = 3600;
/// How long cloudcore waits for the API server's answer.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// What an edge is told when the control plane cannot issue tokens at all.
pub const EMBEDDED_REFUSAL: &str = "the embedded control plane cannot issue service-account tokens";

/// One projected `serviceAccountToken` source of a pod: what a token for it must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    /// Empty for the API server's default audiences.
    pub audience: String,
    pub expiration_seconds: u64,
}

/// What the token check needs to know of a pod bound to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub uid: String,
    pub service_account: String,
    /// Every projected `serviceAccountToken` source of its volumes.
    pub token_sources: Vec<TokenSource>,
}

impl BoundPod {
    /// Reads what the check needs from a pod.
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string());
        let token_sources = spec
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|v| v.projected.as_ref())
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|s| s.service_account_token.as_ref())
            .map(|t| TokenSource {
                audience: t.audience.clone().unwrap_or_default(),
                expiration_seconds: t
                    .expiration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(DEFAULT_EXPIRATION_SECONDS),
            })
            .collect();
        BoundPod {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account,
            token_sources,
        }
    }
}

/// Why a node may not have the token it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pod {pod} is not bound to node {node}")]
    NotBound { node: String, pod: String },
    #[error("pod {pod} uid {asked} is not the bound pod (uid {bound})")]
    UidMismatch {
        pod: String,
        asked: String,
        bound: String,
    },
    #[error("pod {pod} runs as service account {bound}, not {asked}")]
    ServiceAccountMismatch {
        pod: String,
        asked: String,
        bound: String,
    },
    #[error(
        "pod {pod} has no serviceAccountToken volume source with audience {audience:?} and expirationSeconds {expiration_seconds}"
    )]
    NoSuchSource {
        pod: String,
        audience: String,
        expiration_seconds: u64,
    },
}

impl Refusal {
    /// A short snake_case name, the metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotBound { .. } => "not_bound",
            Refusal::UidMismatch { .. } => "uid_mismatch",
            Refusal::ServiceAccountMismatch { .. } => "service_account_mismatch",
            Refusal::NoSuchSource { .. } => "no_such_source",
        }
    }
}

/// Whether `node` may have the token it asks for: `bound` is the pod of that namespace and
/// name bound to `node`, if there is one. Pure, so the rules are tested as a table.
pub fn authorize(
    node: &str,
    request: &TokenRequest,
    bound: Option<&BoundPod>,
) -> Result<(), Refusal> {
    let pod = format!("{}/{}", request.pod.namespace, request.pod.name);
    let Some(bound) = bound else {
        return Err(Refusal::NotBound {
            node: node.to_string(),
            pod,
        });
    };
    if bound.uid != request.pod.uid {
        return Err(Refusal::UidMismatch {
            pod,
            asked: request.pod.uid.clone(),
            bound: bound.uid.clone(),
        });
    }
    if bound.service_account != request.service_account {
        return Err(Refusal::ServiceAccountMismatch {
            pod,
            asked: request.service_account.clone(),
            bound: bound.service_account.clone(),
        });
    }
    let asked = TokenSource {
        audience: request.audience.clone(),
        expiration_seconds: request.expiration_seconds,
    };
    if !bound.token_sources.contains(&asked) {
        return Err(Refusal::NoSuchSource {
            pod,
            audience: asked.audience,
            expiration_seconds: asked.expiration_seconds,
        });
    }
    Ok(())
}

/// Where tokens come from.
#[derive(Clone)]
pub enum Issuer {
    /// A real cluster's TokenRequest API, through cloudcore's own ServiceAccount (RBAC:
    /// `create` on `serviceaccounts/token`).
    Kube(kube::Client),
    /// The embedded control plane: no ServiceAccounts, no tokens.
    Embedded,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Issuer::Kube(_) => f.write_str("Issuer::Kube"),
            Issuer::Embedded => f.write_str("Issuer::Embedded"),
        }
    }
}

impl Issuer {
    /// Asks the API for a token bound to the (already authorized) pod.
    pub async fn issue(&self, request: &TokenRequest) -> Result<IssuedToken, ErrorMessage> {
        let client = match self {
            Issuer::Kube(client) => client,
            Issuer::Embedded => {
                return Err(ErrorMessage {
                    code: ErrorCode::NotSupported,
                    message: EMBEDDED_REFUSAL.to_string(),
                });
            }
        };
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &request.pod.namespace);
        let body = api_request(request);
        let params = PostParams::default();
        let call = api.create_token_request(&request.service_account, &params, &body);
        let answer = match tokio::time::timeout(API_TIMEOUT, call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(kube::Error::Api(status))) => {
                return Err(ErrorMessage {
                    code: ErrorCode::Internal,
                    message: format!(
                        "the API refused the TokenRequest ({} {}): {}",
                        status.code, status.reason, status.message
                    ),
                });
            }
            Ok(Err(e)) => {
                return Err(ErrorMessage {
                    code: ErrorCode::Internal,
                    message: format!("the TokenRequest failed: {e}"),
                });
            }
            Err(_) => {
                return Err(ErrorMessage {
                    code: ErrorCode::Internal,
                    message: format!(
                        "the API did not answer the TokenRequest within {}s",
                        API_TIMEOUT.as_secs()
                    ),
                });
            }
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        issued(answer, now).ok_or_else(|| ErrorMessage {
            code: ErrorCode::Internal,
            message: "the API answered the TokenRequest without a token".to_string(),
        })
    }
}

/// The TokenRequest for the API: the source's audience (none: the API server's default
/// audiences) and lifetime, bound to the pod by name and uid.
pub fn api_request(request: &TokenRequest) -> ApiTokenRequest {
    ApiTokenRequest {
        spec: TokenRequestSpec {
            audiences: if request.audience.is_empty() {
                Vec::new()
            } else {
                vec![request.audience.clone()]
            },
            expiration_seconds: i64::try_from(request.expiration_seconds).ok(),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(request.pod.name.clone()),
                uid: Some(request.pod.uid.clone()),
            }),
        },
        ..ApiTokenRequest::default()
    }
}

/// The token in the API's answer, with the lifetime it was granted as seen from `now` (the
/// API server may have extended the asked one, e.g. 3607 s to a year).
fn issued(answer: ApiTokenRequest, now: i64) -> Option<IssuedToken> {
    let status = answer.status?;
    if status.token.is_empty() {
        return None;
    }
    let expires_at_unix = status.expiration_timestamp.0.as_second();
    Some(IssuedToken {
        token: status.token,
        expires_at_unix,
        lifetime_seconds: u64::try_from(expires_at_unix - now).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request() -> TokenRequest {
        TokenRequest {
            request_id: 1,
            pod: proto::ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: "web".into(),
                uid: "u-1".into(),
            },
            service_account: "default".into(),
            audience: String::new(),
            expiration_seconds: 3607,
        }
    }

    /// A pod as the ServiceAccount admission plugin leaves it.
    fn admitted_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u-1"},
            "spec": {"containers": [{"name": "c"}], "volumes": [
                {"name": "kube-api-access-x", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
                ]}},
                {"name": "vault", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "vault", "audience": "vault"}}
                ]}}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn bound_pod_reads_service_account_and_sources_with_defaults() {
        let bound = BoundPod::of(&admitted_pod());
        assert_eq!(bound.uid, "u-1");
        assert_eq!(bound.service_account, "default");
        assert_eq!(
            bound.token_sources,
            vec![
                TokenSource {
                    audience: String::new(),
                    expiration_seconds: 3607
                },
                TokenSource {
                    audience: "vault".into(),
                    expiration_seconds: 3600
                },
            ]
        );
        let mut named = admitted_pod();
        named.spec.as_mut().unwrap().service_account_name = Some("reader".into());
        assert_eq!(BoundPod::of(&named).service_account, "reader");
    }

    #[test]
    fn only_the_bound_pod_its_service_account_and_its_sources_get_tokens() {
        let bound = BoundPod::of(&admitted_pod());
        type Change = fn(&mut TokenRequest);
        type Case<'a> = (&'a str, Change, Option<&'a BoundPod>, Result<(), &'a str>);
        let cases: [Case<'_>; 7] = [
            ("the admission token", |_| {}, Some(&bound), Ok(())),
            (
                "an explicit audience",
                |r| {
                    r.audience = "vault".into();
                    r.expiration_seconds = 3600;
                },
                Some(&bound),
                Ok(()),
            ),
            ("a pod of another node", |_| {}, None, Err("not_bound")),
            (
                "an older pod of the same name",
                |r| r.pod.uid = "u-0".into(),
                Some(&bound),
                Err("uid_mismatch"),
            ),
            (
                "another service account",
                |r| r.service_account = "admin".into(),
                Some(&bound),
                Err("service_account_mismatch"),
            ),
            (
                "an audience the pod does not ask for",
                |r| r.audience = "https://kubernetes.default.svc".into(),
                Some(&bound),
                Err("no_such_source"),
            ),
            (
                "a longer lifetime than the pod asks for",
                |r| r.expiration_seconds = 86_400,
                Some(&bound),
                Err("no_such_source"),
            ),
        ];
        for (case, change, bound, expected) in cases {
            let mut r = request();
            change(&mut r);
            let got = authorize("gw-1", &r, bound).map_err(|e| e.reason());
            assert_eq!(got, expected, "{case}");
        }
        let refusal = authorize("gw-1", &request(), None).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "pod default/web is not bound to node gw-1"
        );
    }

    #[test]
    fn api_request_binds_the_token_to_the_pod() {
        let body = serde_json::to_value(api_request(&request())).unwrap();
        assert_eq!(
            body["spec"],
            json!({
                "audiences": [],
                "expirationSeconds": 3607,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "u-1"}
            })
        );
        let mut with_audience = request();
        with_audience.audience = "vault".into();
        let body = serde_json::to_value(api_request(&with_audience)).unwrap();
        assert_eq!(body["spec"]["audiences"], json!(["vault"]));
    }

    #[test]
    fn the_granted_lifetime_is_what_the_api_answered() {
        let answer: ApiTokenRequest = serde_json::from_value(json!({
            "spec": {"audiences": [], "expirationSeconds": 3607},
            "status": {"token": "jwt", "expirationTimestamp": "2027-01-01T00:00:00Z"}
        }))
        .unwrap();
        let expiry = 1_798_761_600; // 2027-01-01T00:00:00Z
        let got = issued(answer.clone(), expiry - 31_536_000).unwrap();
        assert_eq!(got.token, "jwt");
        assert_eq!(got.expires_at_unix, expiry);
        assert_eq!(
            got.lifetime_seconds, 31_536_000,
            "an extended token lasts a year"
        );
        assert_eq!(issued(answer, expiry + 5).unwrap().lifetime_seconds, 0);
    }

    #[tokio::test]
    async fn embedded_mode_refuses_with_a_clear_error() {
        let err = Issuer::Embedded.issue(&request()).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::NotSupported);
        assert_eq!(err.message, EMBEDDED_REFUSAL);
    }
}
