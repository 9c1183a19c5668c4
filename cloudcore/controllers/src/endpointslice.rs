//! The EndpointSlice controller (and, alongside, the legacy Endpoints controller) for the
//! embedded control plane, in the shape of kube-controller-manager's: for every Service with a
//! selector, the pods of its namespace it selects become discovery.k8s.io/v1 EndpointSlices
//! and one core/v1 Endpoints object, kept current as pods come, go and change readiness.
//!
//! What a slice holds follows kube's controller:
//! - one endpoint per pod with an IP (of each address family the Service uses), not in a
//!   terminal phase; `conditions.ready` is the pod's Ready condition and no deletion under
//!   way (always true with `publishNotReadyAddresses`), `serving` the Ready condition,
//!   `terminating` a set `deletionTimestamp`; `nodeName`, `targetRef` (the pod), and
//!   `hostname` for pods whose `spec.hostname` is set and whose `spec.subdomain` names the
//!   Service;
//! - the ports are the Service's, with a named `targetPort` resolved per pod in its
//!   containers' ports (same protocol); a pod lacking that name is left out of that port, so
//!   pods with different resolved ports land in different slices;
//! - at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints a slice; a Service selecting no pod keeps
//!   one empty slice, as kube's does;
//! - labels: the Service's own, `kubernetes.io/service-name`,
//!   `endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io` (and
//!   `service.kubernetes.io/headless` for a headless Service); an owner reference to the
//!   Service, so the garbage collector removes them with it (this controller also deletes the
//!   slices it manages when their Service is gone).
//!
//! Slices of Services without a selector, and slices other controllers manage, are never
//! touched. ExternalName Services get none, as in kube.
//!
//! The Endpoints object (named like the Service) carries the same pods in `subsets`, ready
//! ones in `addresses` and the others in `notReadyAddresses`, without terminating pods unless
//! `publishNotReadyAddresses` — what `kubectl describe svc` of older kubectl versions reads. It
//! is labelled `endpoints.kubernetes.io/managed-by: endpoint-controller`, as kube 1.33's, and
//! only Endpoints with that label are deleted when their Service goes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference, Pod,
    Service, ServicePort,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Context;
use crate::informer::{Key, Listing, Queue, SharedInformer, Synced, key_of, observed, watch};
use crate::pods;

/// The name this controller reports its caches' state under.
pub const NAME: &str = "endpointslice";
/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming the controller that manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's value of [`MANAGED_BY_LABEL`] (kube-controller-manager's).
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
/// The label kube 1.33's Endpoints controller puts on the Endpoints it manages.
pub const ENDPOINTS_MANAGED_BY_LABEL: &str = "endpoints.kubernetes.io/managed-by";
/// This controller's value of [`ENDPOINTS_MANAGED_BY_LABEL`].
pub const ENDPOINTS_MANAGED_BY: &str = "endpoint-controller";
/// The label on the slices and Endpoints of a headless Service.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Endpoints per slice at most (kube-controller-manager's `--max-endpoints-per-slice`).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// A failed pass runs again after this.
const RETRY: Duration = Duration::from_secs(2);

/// Why a Service's endpoints could not be written.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("cannot {verb} EndpointSlice {name}")]
    Slice {
        verb: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot {verb} Endpoints {name}")]
    Endpoints {
        verb: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The EndpointSlice and Endpoints controller, following Pods through the shared `pods`
/// informer (its handler is added here); the future runs it until `shutdown`.
pub(crate) fn run(
    ctx: Arc<Context>,
    pods: &mut SharedInformer<Pod>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let client = ctx.client.clone();
    let queue = Arc::new(Queue::default());
    let synced = Synced::new(ctx.clone(), NAME);
    let (services, services_driver) = watch(
        Api::<Service>::all(client.clone()),
        queue.clone(),
        &synced,
        |service| vec![key_of(&service.metadata)],
    );
    // A pod's labels may have changed away from a Service's selector: every Service of its
    // namespace looks again (the cache shows only the pod's new labels).
    let namespace_services = services.clone();
    pods.add_keys(queue.clone(), &synced, move |pod| {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        namespace_services
            .state()
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .map(|s| key_of(&s.metadata))
            .collect()
    });
    let pods_listed = pods.listing();
    let pods = pods.store();
    let (slices, slices_driver) = watch(
        Api::<EndpointSlice>::all(client.clone()),
        queue.clone(),
        &synced,
        |slice| managed_slice_service(&slice.metadata).into_iter().collect(),
    );
    let (endpoints, endpoints_driver) = watch(
        Api::<Endpoints>::all(client.clone()),
        queue.clone(),
        &synced,
        |e| vec![key_of(&e.metadata)],
    );
    let controller = Controller {
        client,
        services,
        pods,
        pods_listed,
        slices,
        endpoints,
    };
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = futures::future::join3(services_driver, slices_driver, endpoints_driver) => {}
            _ = controller.work(&queue) => {}
        }
    }
}

/// The Service of a slice this controller manages.
fn managed_slice_service(meta: &ObjectMeta) -> Option<Key> {
    let labels = meta.labels.as_ref()?;
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return None;
    }
    Some((
        meta.namespace.clone().unwrap_or_default(),
        labels.get(SERVICE_NAME_LABEL)?.clone(),
    ))
}

struct Controller {
    client: kube::Client,
    services: Store<Service>,
    /// The shared pod cache; wait for it with `pods_listed`, never `wait_until_ready`.
    pods: Store<Pod>,
    pods_listed: Listing,
    slices: Store<EndpointSlice>,
    endpoints: Store<Endpoints>,
}

impl Controller {
    async fn work(&self, queue: &Queue) {
        let ready = [
            self.services.wait_until_ready().await.is_ok(),
            self.pods_listed.wait().await.is_ok(),
            self.slices.wait_until_ready().await.is_ok(),
            self.endpoints.wait_until_ready().await.is_ok(),
        ];
        if !ready.iter().all(|r| *r) {
            return;
        }
        loop {
            for key in queue.next().await {
                let span = tracing::debug_span!("reconcile", namespace = %key.0, service = %key.1);
                if let Err(e) = self.reconcile(&key).instrument(span).await {
                    tracing::warn!(service = %key.1, namespace = %key.0, error = %e, cause = ?std::error::Error::source(&e), "sync failed");
                    queue.add_after(key, RETRY);
                }
            }
        }
    }

    /// Brings one Service's slices and Endpoints to what its pods say.
    async fn reconcile(&self, key: &Key) -> Result<(), SyncError> {
        let (namespace, name) = key;
        let service = self
            .services
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|s| s.metadata.deletion_timestamp.is_none());
        let existing: Vec<Arc<EndpointSlice>> = self
            .slices
            .state_filter(|s| managed_slice_service(&s.metadata).as_ref() == Some(key));
        let current_endpoints = self.endpoints.get(&ObjectRef::new(name).within(namespace));
        let desired = match service.as_deref() {
            None => Some(Desired::default()),
            Some(service) if !has_selector(service) || is_external_name(service) => None,
            Some(service) => {
                let pods = self.pods.state_filter(|p| {
                    p.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && selects(service, p)
                });
                Some(desired(service, &pods))
            }
        };
        // Neither a selector nor gone: another party's slices and Endpoints stay as they are.
        let Some(desired) = desired else {
            return Ok(());
        };
        let writes = plan(&desired.slices, &existing);
        let mut written: Vec<(String, Option<String>)> = Vec::new();
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        for write in writes {
            match write {
                SliceWrite::Create(slice) => {
                    let made = slices
                        .create(&PostParams::default(), &slice)
                        .await
                        .map_err(|source| SyncError::Slice {
                            verb: "create",
                            name: format!("{namespace}/{name}-*"),
                            source,
                        })?;
                    tracing::debug!(
                        slice = made.metadata.name.as_deref().unwrap_or(""),
                        "created"
                    );
                    written.push((
                        made.metadata.name.clone().unwrap_or_default(),
                        made.metadata.resource_version.clone(),
                    ));
                }
                SliceWrite::Update(slice) => {
                    let slice_name = slice.metadata.name.clone().unwrap_or_default();
                    let made = slices
                        .replace(&slice_name, &PostParams::default(), &slice)
                        .await
                        .map_err(|source| SyncError::Slice {
                            verb: "update",
                            name: format!("{namespace}/{slice_name}"),
                            source,
                        })?;
                    written.push((slice_name, made.metadata.resource_version.clone()));
                }
                SliceWrite::Delete(slice_name) => {
                    match slices.delete(&slice_name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(status)) if status.code == 404 => {}
                        Err(source) => {
                            return Err(SyncError::Slice {
                                verb: "delete",
                                name: format!("{namespace}/{slice_name}"),
                                source,
                            });
                        }
                    }
                    written.push((slice_name, None));
                }
            }
        }
        self.write_endpoints(key, desired.endpoints, current_endpoints.as_deref())
            .await?;
        // The next pass must see these writes, or it would create the same slice again.
        observed(|| {
            written.iter().all(|(slice_name, rv)| {
                let seen = self
                    .slices
                    .get(&ObjectRef::new(slice_name).within(namespace));
                match rv {
                    Some(rv) => {
                        seen.is_some_and(|s| s.metadata.resource_version.as_ref() == Some(rv))
                    }
                    None => seen.is_none(),
                }
            })
        })
        .await;
        Ok(())
    }

    /// Creates, updates or deletes the Service's Endpoints (`None`: the Service is gone).
    async fn write_endpoints(
        &self,
        key: &Key,
        desired: Option<Endpoints>,
        current: Option<&Endpoints>,
    ) -> Result<(), SyncError> {
        let (namespace, name) = key;
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), namespace);
        let error = |verb: &'static str| {
            move |source| SyncError::Endpoints {
                verb,
                name: format!("{namespace}/{name}"),
                source,
            }
        };
        match (desired, current) {
            (None, Some(current)) if endpoints_managed(current) => {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(e) => Err(error("delete")(e)),
                }
            }
            (None, _) => Ok(()),
            (Some(desired), None) => api
                .create(&PostParams::default(), &desired)
                .await
                .map(|_| ())
                .map_err(error("create")),
            (Some(mut desired), Some(current)) => {
                if same_endpoints(&desired, current) {
                    return Ok(());
                }
                desired.metadata.resource_version = current.metadata.resource_version.clone();
                api.replace(name, &PostParams::default(), &desired)
                    .await
                    .map(|_| ())
                    .map_err(error("update"))
            }
        }
    }
}

fn endpoints_managed(endpoints: &Endpoints) -> bool {
    endpoints
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ENDPOINTS_MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(ENDPOINTS_MANAGED_BY)
}

fn has_selector(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

fn is_external_name(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName")
}

fn is_headless(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// Whether the Service's (non-empty) selector matches the pod's labels.
fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// What a Service's endpoints should be: the slices' content (without names) and the
/// Endpoints object; `endpoints: None` with no slices means the Service is gone.
#[derive(Debug, Default)]
struct Desired {
    slices: Vec<EndpointSlice>,
    endpoints: Option<Endpoints>,
}

/// A Service port resolved for one pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ResolvedPort {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
}

/// The Service's ports as `pod` serves them; a named target port the pod lacks is left out.
fn resolve_ports(ports: &[ServicePort], pod: &Pod) -> Vec<ResolvedPort> {
    ports
        .iter()
        .filter_map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => container_port(pod, name, &protocol)?,
            };
            Some(ResolvedPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect()
}

/// The container port named `name` with `protocol` (default TCP) in the pod's containers.
fn container_port(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol
        })
        .map(|p| p.container_port)
}

/// The pod's IPs, by address type (`IPv4`, `IPv6`).
fn pod_ips(pod: &Pod) -> BTreeMap<&'static str, String> {
    let status = pod.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let ips = if listed.is_empty() {
        status.and_then(|s| s.pod_ip.clone()).into_iter().collect()
    } else {
        listed
    };
    let mut by_type = BTreeMap::new();
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => by_type.entry("IPv4").or_insert(ip),
            Ok(IpAddr::V6(_)) => by_type.entry("IPv6").or_insert(ip),
            Err(_) => continue,
        };
    }
    by_type
}

/// The address types a Service's slices use: its `ipFamilies`, else (headless Services
/// without them) whatever the pods have.
fn address_types(service: &Service) -> Option<BTreeSet<&'static str>> {
    let families = service.spec.as_ref()?.ip_families.as_ref()?;
    let types: BTreeSet<&'static str> = families
        .iter()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some("IPv4"),
            "IPv6" => Some("IPv6"),
            _ => None,
        })
        .collect();
    (!types.is_empty()).then_some(types)
}

/// What the Service's slices and Endpoints should hold for `pods` (those it selects).
fn desired(service: &Service, pods: &[Arc<Pod>]) -> Desired {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let spec = service.spec.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let service_ports = spec.ports.clone().unwrap_or_default();
    let families = address_types(service);
    // (address type, ports) → endpoints; (ports) → (ready, not ready) addresses.
    let mut groups: BTreeMap<(&'static str, Vec<ResolvedPort>), Vec<Endpoint>> = BTreeMap::new();
    let mut subsets: BTreeMap<Vec<ResolvedPort>, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    let mut sorted: Vec<&Arc<Pod>> = pods.iter().collect();
    sorted.sort_by_key(|p| p.metadata.name.clone());
    for pod in sorted {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let pod_ready = pods::is_ready(pod);
        let ready = publish_not_ready || (pod_ready && !terminating);
        let serving = publish_not_ready || pod_ready;
        let pod_spec = pod.spec.as_ref();
        let hostname = pod_spec
            .and_then(|s| s.hostname.clone())
            .filter(|h| !h.is_empty())
            .filter(|_| pod_spec.and_then(|s| s.subdomain.as_deref()) == Some(name.as_str()));
        let node_name = pod_spec.and_then(|s| s.node_name.clone());
        let target_ref = ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(namespace.clone()),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        let ports = resolve_ports(&service_ports, pod);
        for (address_type, ip) in &ips {
            if families.as_ref().is_some_and(|f| !f.contains(address_type)) {
                continue;
            }
            groups
                .entry((address_type, ports.clone()))
                .or_default()
                .push(Endpoint {
                    addresses: vec![ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(serving),
                        terminating: Some(terminating),
                    }),
                    hostname: hostname.clone(),
                    node_name: node_name.clone(),
                    target_ref: Some(target_ref.clone()),
                    ..Endpoint::default()
                });
        }
        // The legacy Endpoints: terminating pods only with publishNotReadyAddresses.
        if terminating && !publish_not_ready {
            continue;
        }
        let primary = families
            .as_ref()
            .and_then(|f| f.iter().find_map(|t| ips.get(t)))
            .or_else(|| ips.values().next());
        if let Some(ip) = primary {
            let address = EndpointAddress {
                ip: ip.clone(),
                hostname: hostname.clone(),
                node_name: node_name.clone(),
                target_ref: Some(target_ref.clone()),
            };
            let subset = subsets.entry(ports).or_default();
            if ready {
                subset.0.push(address);
            } else {
                subset.1.push(address);
            }
        }
    }

    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.remove(HEADLESS_LABEL);
    if is_headless(service) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    let mut endpoint_labels = labels.clone();
    endpoint_labels.insert(
        ENDPOINTS_MANAGED_BY_LABEL.into(),
        ENDPOINTS_MANAGED_BY.into(),
    );
    labels.insert(SERVICE_NAME_LABEL.into(), name.clone());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let owner = pods::owner_reference("v1", "Service", &service.metadata);
    let slice_of =
        |address_type: &str, ports: &[ResolvedPort], endpoints: Vec<Endpoint>| EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(namespace.clone()),
                generate_name: Some(format!("{name}-")),
                labels: Some(labels.clone()),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            address_type: address_type.to_string(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|p| EndpointPort {
                        name: Some(p.name.clone()),
                        port: Some(p.port),
                        protocol: Some(p.protocol.clone()),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
            ),
        };
    let mut slices = Vec::new();
    for ((address_type, ports), endpoints) in groups {
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(slice_of(address_type, &ports, chunk.to_vec()));
        }
    }
    if slices.is_empty() {
        // kube's placeholder: a Service that selects nothing still has one (empty) slice.
        let address_type = families
            .as_ref()
            .and_then(|f| f.iter().next().copied())
            .unwrap_or("IPv4");
        slices.push(slice_of(address_type, &[], Vec::new()));
    }

    let endpoints = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(endpoint_labels),
            ..ObjectMeta::default()
        },
        subsets: (!subsets.is_empty()).then(|| {
            subsets
                .into_iter()
                .map(|(ports, (ready, not_ready))| EndpointSubset {
                    addresses: (!ready.is_empty()).then_some(ready),
                    not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                    ports: (!ports.is_empty()).then(|| {
                        ports
                            .into_iter()
                            .map(|p| CorePort {
                                name: (!p.name.is_empty()).then_some(p.name),
                                port: p.port,
                                protocol: Some(p.protocol),
                                app_protocol: p.app_protocol,
                            })
                            .collect()
                    }),
                })
                .collect()
        }),
    };
    Desired {
        slices,
        endpoints: Some(endpoints),
    }
}

/// One write to a Service's slices.
#[derive(Debug, Clone, PartialEq)]
enum SliceWrite {
    Create(EndpointSlice),
    /// The existing slice's name and resourceVersion, with the desired content.
    Update(EndpointSlice),
    Delete(String),
}

/// The ports of a slice, comparable.
fn slice_ports(slice: &EndpointSlice) -> Vec<(String, i32, String, Option<String>)> {
    slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port.unwrap_or_default(),
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.app_protocol.clone(),
            )
        })
        .collect()
}

/// The parts of an endpoint this controller sets, comparable.
type EndpointView = (
    Vec<String>,
    (bool, bool, bool),
    Option<String>,
    Option<String>,
    Option<(Option<String>, Option<String>, Option<String>)>,
);

fn endpoint_view(e: &Endpoint) -> EndpointView {
    let c = e.conditions.clone().unwrap_or_default();
    (
        e.addresses.clone(),
        (
            c.ready.unwrap_or(false),
            c.serving.unwrap_or(false),
            c.terminating.unwrap_or(false),
        ),
        e.hostname.clone(),
        e.node_name.clone(),
        e.target_ref
            .as_ref()
            .map(|r| (r.name.clone(), r.namespace.clone(), r.uid.clone())),
    )
}

/// Whether `existing` already says what `desired` says.
fn same_slice(desired: &EndpointSlice, existing: &EndpointSlice) -> bool {
    let owners = |s: &EndpointSlice| {
        s.metadata
            .owner_references
            .iter()
            .flatten()
            .map(|o| o.uid.clone())
            .collect::<Vec<_>>()
    };
    desired.metadata.labels == existing.metadata.labels
        && owners(desired) == owners(existing)
        && slice_ports(desired) == slice_ports(existing)
        && desired
            .endpoints
            .iter()
            .map(endpoint_view)
            .eq(existing.endpoints.iter().map(endpoint_view))
}

/// The writes that turn `existing` (this Service's managed slices) into `desired`: a slice of
/// the same address type and ports is reused (updated only when it differs), the rest created
/// or deleted.
fn plan(desired: &[EndpointSlice], existing: &[Arc<EndpointSlice>]) -> Vec<SliceWrite> {
    let mut unused: Vec<&Arc<EndpointSlice>> = existing.iter().collect();
    unused.sort_by_key(|s| s.metadata.name.clone());
    let mut writes = Vec::new();
    for want in desired {
        let same_shape = |s: &&Arc<EndpointSlice>| {
            s.address_type == want.address_type && slice_ports(s) == slice_ports(want)
        };
        // An identical slice first, then any of the same shape.
        let found = unused
            .iter()
            .position(|s| same_slice(want, s))
            .or_else(|| unused.iter().position(same_shape));
        match found {
            Some(i) => {
                let have = unused.remove(i);
                if !same_slice(want, have) {
                    let mut slice = want.clone();
                    slice.metadata.name = have.metadata.name.clone();
                    slice.metadata.generate_name = None;
                    slice.metadata.resource_version = have.metadata.resource_version.clone();
                    writes.push(SliceWrite::Update(slice));
                }
            }
            None => writes.push(SliceWrite::Create(want.clone())),
        }
    }
    writes.extend(
        unused
            .into_iter()
            .map(|s| SliceWrite::Delete(s.metadata.name.clone().unwrap_or_default())),
    );
    writes
}

/// Whether the Endpoints already say what `desired` says (labels and subsets, with empty
/// lists and absent ones alike).
fn same_endpoints(desired: &Endpoints, current: &Endpoints) -> bool {
    let subsets = |e: &Endpoints| {
        e.subsets
            .iter()
            .flatten()
            .map(|s| {
                let addresses = |a: &Option<Vec<EndpointAddress>>| {
                    a.iter()
                        .flatten()
                        .map(|a| {
                            (
                                a.ip.clone(),
                                a.hostname.clone(),
                                a.node_name.clone(),
                                a.target_ref.as_ref().and_then(|r| r.uid.clone()),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let ports = s
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        (
                            p.name.clone().unwrap_or_default(),
                            p.port,
                            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        )
                    })
                    .collect::<Vec<_>>();
                (
                    addresses(&s.addresses),
                    addresses(&s.not_ready_addresses),
                    ports,
                )
            })
            .collect::<Vec<_>>()
    };
    desired.metadata.labels == current.metadata.labels && subsets(desired) == subsets(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid",
                "labels": {"team": "a"}},
            "spec": spec,
        }))
        .expect("service")
    }

    fn web() -> Service {
        service(json!({
            "selector": {"app": "web"},
            "clusterIP": "10.96.0.10", "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                      {"name": "metrics", "port": 9090, "targetPort": 9090}]
        }))
    }

    fn pod(name: &str, ip: &str, ready: bool, http_port: Option<i32>) -> Arc<Pod> {
        let ports: Vec<_> = http_port
            .map(|p| json!({"name": "http", "containerPort": p}))
            .into_iter()
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                    "labels": {"app": "web"}},
                "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "i", "ports": ports}]},
                "status": {"podIP": ip, "phase": "Running",
                    "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .expect("pod"),
        )
    }

    fn conditions(e: &Endpoint) -> (bool, bool, bool) {
        endpoint_view(e).1
    }

    #[test]
    fn pods_become_endpoints_with_readiness_node_and_target() {
        let pods = vec![
            pod("a", "10.0.0.1", true, Some(8080)),
            pod("b", "10.0.0.2", false, Some(8080)),
        ];
        let d = desired(&web(), &pods);
        assert_eq!(d.slices.len(), 1);
        let slice = &d.slices[0];
        assert_eq!(slice.address_type, "IPv4");
        let labels = slice.metadata.labels.clone().expect("labels");
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels["team"], "a", "the Service's labels are copied");
        let owner = &slice.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Service", "svc-uid")
        );
        assert_eq!(
            slice_ports(slice),
            vec![
                ("http".into(), 8080, "TCP".into(), None),
                ("metrics".into(), 9090, "TCP".into(), None)
            ]
        );
        assert_eq!(slice.endpoints[0].addresses, vec!["10.0.0.1"]);
        assert_eq!(conditions(&slice.endpoints[0]), (true, true, false));
        assert_eq!(conditions(&slice.endpoints[1]), (false, false, false));
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("edge-1"));
        let target = slice.endpoints[0].target_ref.as_ref().expect("target");
        assert_eq!(target.name.as_deref(), Some("a"));
        assert_eq!(target.uid.as_deref(), Some("uid-a"));
        // The legacy Endpoints: ready in addresses, the other in notReadyAddresses.
        let endpoints = d.endpoints.expect("endpoints");
        let subsets = endpoints.subsets.expect("subsets");
        assert_eq!(subsets.len(), 1);
        assert_eq!(
            subsets[0].addresses.as_ref().expect("ready")[0].ip,
            "10.0.0.1"
        );
        assert_eq!(
            subsets[0].not_ready_addresses.as_ref().expect("not ready")[0].ip,
            "10.0.0.2"
        );
        assert_eq!(
            endpoints.metadata.labels.expect("labels")[ENDPOINTS_MANAGED_BY_LABEL],
            ENDPOINTS_MANAGED_BY
        );
    }

    #[test]
    fn a_pod_lacking_a_named_port_goes_to_a_slice_without_that_port() {
        let pods = vec![
            pod("a", "10.0.0.1", true, Some(8080)),
            pod("b", "10.0.0.2", true, None),
            pod("c", "10.0.0.3", true, Some(8081)),
        ];
        let d = desired(&web(), &pods);
        let mut shapes: Vec<_> = d
            .slices
            .iter()
            .map(|s| {
                (
                    slice_ports(s).into_iter().map(|p| p.1).collect::<Vec<_>>(),
                    s.endpoints
                        .iter()
                        .map(|e| e.addresses[0].clone())
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        shapes.sort();
        assert_eq!(
            shapes,
            vec![
                (vec![8080, 9090], vec!["10.0.0.1".to_string()]),
                (vec![8081, 9090], vec!["10.0.0.3".to_string()]),
                (vec![9090], vec!["10.0.0.2".to_string()]),
            ]
        );
    }

    #[test]
    fn terminating_hostname_publish_not_ready_and_skipped_pods() {
        let mut terminating = (*pod("t", "10.0.0.4", true, Some(80))).clone();
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut named = (*pod("h", "10.0.0.5", true, Some(80))).clone();
        let spec = named.spec.as_mut().expect("spec");
        spec.hostname = Some("h-0".into());
        spec.subdomain = Some("web".into());
        let mut elsewhere = (*pod("o", "10.0.0.6", true, Some(80))).clone();
        let spec = elsewhere.spec.as_mut().expect("spec");
        spec.hostname = Some("o-0".into());
        spec.subdomain = Some("other".into());
        let mut done = (*pod("d", "10.0.0.7", true, Some(80))).clone();
        done.status.as_mut().expect("status").phase = Some("Succeeded".into());
        let no_ip = pod("n", "", true, Some(80));
        let pods: Vec<Arc<Pod>> = vec![
            Arc::new(terminating),
            Arc::new(named),
            Arc::new(elsewhere),
            Arc::new(done),
            no_ip,
        ];
        let d = desired(&web(), &pods);
        let endpoints: Vec<&Endpoint> = d.slices.iter().flat_map(|s| &s.endpoints).collect();
        let by_ip = |ip: &str| {
            *endpoints
                .iter()
                .find(|e| e.addresses[0] == ip)
                .unwrap_or_else(|| panic!("{ip} missing"))
        };
        assert_eq!(endpoints.len(), 3, "no terminal pod, no pod without an IP");
        assert_eq!(conditions(by_ip("10.0.0.4")), (false, true, true));
        assert_eq!(by_ip("10.0.0.5").hostname.as_deref(), Some("h-0"));
        assert_eq!(
            by_ip("10.0.0.6").hostname,
            None,
            "subdomain names another Service"
        );
        // The legacy Endpoints leave the terminating pod out.
        let subsets = d.endpoints.expect("endpoints").subsets.expect("subsets");
        let ips: Vec<_> = subsets
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| a.ip.as_str())
            .collect();
        assert_eq!(ips, vec!["10.0.0.5", "10.0.0.6"]);

        // publishNotReadyAddresses: every endpoint is ready.
        let mut svc = web();
        svc.spec.as_mut().expect("spec").publish_not_ready_addresses = Some(true);
        let d = desired(&svc, &[pod("b", "10.0.0.2", false, Some(80))]);
        assert_eq!(conditions(&d.slices[0].endpoints[0]), (true, true, false));
    }

    #[test]
    fn at_most_one_hundred_endpoints_a_slice_and_one_placeholder_when_empty() {
        let pods: Vec<Arc<Pod>> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                    true,
                    Some(80),
                )
            })
            .collect();
        let d = desired(&web(), &pods);
        let sizes: Vec<usize> = d.slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        let d = desired(&web(), &[]);
        assert_eq!(d.slices.len(), 1);
        assert!(d.slices[0].endpoints.is_empty());
        assert_eq!(d.endpoints.expect("endpoints").subsets, None);
    }

    #[test]
    fn headless_services_are_labelled_and_selectors_match_every_pair() {
        let svc = service(json!({"selector": {"app": "web", "tier": "x"}, "clusterIP": "None"}));
        let d = desired(&svc, &[]);
        let labels = d.slices[0].metadata.labels.clone().expect("labels");
        assert_eq!(labels.get(HEADLESS_LABEL).map(String::as_str), Some(""));
        let only_app = pod("a", "10.0.0.1", true, None);
        assert!(!selects(&svc, &only_app));
        assert!(selects(&web(), &only_app));
        let no_selector = service(json!({"ports": [{"port": 80}]}));
        assert!(!has_selector(&no_selector));
        assert!(!selects(&no_selector, &only_app));
    }

    fn named(slice: &EndpointSlice, name: &str, rv: &str) -> Arc<EndpointSlice> {
        let mut s = slice.clone();
        s.metadata.name = Some(name.into());
        s.metadata.generate_name = None;
        s.metadata.resource_version = Some(rv.into());
        Arc::new(s)
    }

    #[test]
    fn plans_reuse_same_shaped_slices_and_write_only_differences() {
        let before = desired(&web(), &[pod("a", "10.0.0.1", true, Some(8080))]).slices;
        let existing = vec![
            named(&before[0], "web-abc", "5"),
            named(&before[0], "web-dup", "6"),
        ];
        // Nothing changed: the duplicate goes, nothing else is written.
        assert_eq!(
            plan(&before, &existing),
            vec![SliceWrite::Delete("web-dup".into())]
        );
        // Readiness changed: the slice is updated in place at its resourceVersion.
        let after = desired(&web(), &[pod("a", "10.0.0.1", false, Some(8080))]).slices;
        let writes = plan(&after, &existing[..1]);
        let [SliceWrite::Update(slice)] = writes.as_slice() else {
            panic!("{writes:?}");
        };
        assert_eq!(slice.metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(slice.metadata.resource_version.as_deref(), Some("5"));
        assert_eq!(conditions(&slice.endpoints[0]), (false, false, false));
        // The target port changed: a new shape, so a new slice and the old one goes.
        let moved = desired(&web(), &[pod("a", "10.0.0.1", true, Some(8081))]).slices;
        let writes = plan(&moved, &existing[..1]);
        assert!(matches!(writes[0], SliceWrite::Create(_)), "{writes:?}");
        assert_eq!(writes[1], SliceWrite::Delete("web-abc".into()));
    }

    #[test]
    fn endpoints_compare_by_content() {
        let d = desired(&web(), &[pod("a", "10.0.0.1", true, Some(8080))]);
        let mut current = d.endpoints.clone().expect("endpoints");
        current.metadata.resource_version = Some("7".into());
        assert!(same_endpoints(d.endpoints.as_ref().expect("e"), &current));
        let other = desired(&web(), &[pod("a", "10.0.0.1", false, Some(8080))]);
        assert!(!same_endpoints(
            other.endpoints.as_ref().expect("e"),
            &current
        ));
        assert!(endpoints_managed(&current));
    }

    #[test]
    fn only_slices_this_controller_manages_name_their_service() {
        let d = desired(&web(), &[]);
        let meta = &d.slices[0].metadata;
        assert_eq!(
            managed_slice_service(meta),
            Some(("ns".into(), "web".into()))
        );
        let mut foreign = meta.clone();
        foreign
            .labels
            .as_mut()
            .expect("labels")
            .insert(MANAGED_BY_LABEL.into(), "someone-else".into());
        assert_eq!(managed_slice_service(&foreign), None);
    }
}
