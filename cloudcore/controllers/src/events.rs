//! The Event recorder: core/v1 Events about an object, as client-go's recorder writes them for
//! the kubelet and kube-controller-manager. Events are best effort: a failed write is logged and
//! never fails or blocks the caller's work.
//!
//! Issue 14 asks for aggregation (a repeat raises `count` and `lastTimestamp` of the existing
//! Event instead of creating another), rate limits and an hour's expiry; this first version
//! creates one Event per call.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};

/// `Normal` or `Warning`, the two types kubectl shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Writes Events as one component (`source.component`, e.g. `deployment-controller`), on one
/// host (`source.host`, the node for the kubelet's events).
#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    component: String,
    host: Option<String>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("component", &self.component)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(client: kube::Client, component: &str) -> Self {
        Recorder {
            client,
            component: component.to_string(),
            host: None,
        }
    }

    /// The same recorder writing as another component (each controller has its own name).
    pub fn for_component(&self, component: &str) -> Self {
        Recorder {
            client: self.client.clone(),
            component: component.to_string(),
            host: self.host.clone(),
        }
    }

    /// The same recorder with `source.host` set.
    pub fn on_host(&self, host: &str) -> Self {
        Recorder {
            client: self.client.clone(),
            component: self.component.clone(),
            host: Some(host.to_string()),
        }
    }

    /// Records that `reason` happened to `object`, with a human `message`. Never fails: an
    /// Event that cannot be written is logged at debug level and dropped.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let namespace = object
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let name = format!(
            "{}.{:x}",
            object.name.as_deref().unwrap_or("unknown"),
            now.0.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            type_: Some(type_.as_str().to_string()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: self.host.clone(),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::debug!(error = %e, reason, "cannot record event");
        }
    }
}
