//! KubeEdge's device topics (`$hw/events/device/{namespace}/{name}/...`) on a local MQTT
//! broker ([docs/devices.md](../../../../docs/devices.md#mqtt-kubeedges-device-topics)).
//!
//! edgecore is a client of the broker (`--mqtt-broker`): it answers `…/twin/update` (actual
//! values become reported twins), `…/twin/get` and `…/state/update`, and publishes
//! `…/twin/update/delta` when a desired value changes, `…/twin/update/document` on each twin
//! change (from the cloud, a mapper over DMI or MQTT) and `…/state/update/result` on each state
//! change. `Speaker` decides what to publish, without IO; `run` moves the bytes and reconnects
//! forever (a broker that is down is a warning, never an error).

pub mod payload;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::dmi::{DeviceAccess, STATES, normalize_state};
use super::{DeviceError, DeviceEvent, Devices, Reported, TwinView};
use payload::{
    BAD_REQUEST, BaseMessage, DeviceState, ErrorResult, INTERNAL_ERROR, MsgTwin, NOT_FOUND,
    Request, StateResult, StateUpdate, TwinMessage, TwinValue, TypeMetadata, ValueMetadata,
};

/// KubeEdge's eventbus default.
pub const DEFAULT_BROKER: &str = "tcp://127.0.0.1:1883";

/// Largest MQTT packet accepted or sent.
const MAX_PACKET: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BrokerError {
    #[error("broker {0:?} is not tcp://HOST:PORT")]
    Syntax(String),
}

/// `tcp://HOST:PORT` → host and port.
pub fn parse_broker(broker: &str) -> Result<(String, u16), BrokerError> {
    let syntax = || BrokerError::Syntax(broker.to_string());
    let rest = broker.strip_prefix("tcp://").ok_or_else(syntax)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(syntax)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| syntax())?;
    if host.is_empty() || port == 0 || host.contains('/') {
        return Err(syntax());
    }
    Ok((host.to_string(), port))
}

/// Which device's twin or state changed outside the `Devices` events (through DMI), for the
/// MQTT side to publish. A `Notices` without a listener (MQTT off) drops them.
#[derive(Clone, Debug)]
pub struct Notices {
    sender: broadcast::Sender<(String, String)>,
}

impl Default for Notices {
    fn default() -> Self {
        Notices::new()
    }
}

impl Notices {
    pub fn new() -> Notices {
        Notices {
            sender: broadcast::channel(1024).0,
        }
    }

    /// The twin or state of `namespace/name` changed.
    pub fn touch(&self, namespace: &str, name: &str) {
        let _ = self.sender.send((namespace.to_string(), name.to_string()));
    }

    fn subscribe(&self) -> broadcast::Receiver<(String, String)> {
        self.sender.subscribe()
    }

    #[cfg(test)]
    pub(crate) fn subscribe_for_tests(&self) -> broadcast::Receiver<(String, String)> {
        self.sender.subscribe()
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Outgoing {
    fn new<T: serde::Serialize>(namespace: &str, name: &str, suffix: &str, body: &T) -> Outgoing {
        Outgoing {
            topic: payload::topic(namespace, name, suffix),
            payload: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    fn error(
        namespace: &str,
        name: &str,
        suffix: &str,
        event_id: String,
        code: i32,
        reason: String,
    ) -> Outgoing {
        tracing::debug!(namespace, name, suffix, code, %reason, "MQTT request refused");
        let body = ErrorResult {
            base: BaseMessage::answering(event_id),
            code,
            reason,
        };
        Outgoing::new(namespace, name, suffix, &body)
    }
}

/// Decides what to publish: answers requests and turns twin and state changes into messages.
/// Keeps the last twin seen per device, so a document says what changed.
pub struct Speaker<D: DeviceAccess> {
    devices: D,
    last: HashMap<(String, String), TwinView>,
}

fn code_of(error: &DeviceError) -> i32 {
    match error {
        DeviceError::UnknownDevice { .. } | DeviceError::UnknownProperty { .. } => NOT_FOUND,
        DeviceError::Store(_) => INTERNAL_ERROR,
    }
}

impl<D: DeviceAccess> Speaker<D> {
    /// Starts from the twins the node holds now (nothing is published for them).
    pub fn new(devices: D) -> Speaker<D> {
        let mut speaker = Speaker {
            devices,
            last: HashMap::new(),
        };
        for device in speaker.devices.devices() {
            let key = (device.namespace().to_string(), device.name().to_string());
            if let Some(view) = speaker.devices.twin(&key.0, &key.1) {
                speaker.last.insert(key, view);
            }
        }
        speaker
    }

    /// A publish on a subscribed topic.
    pub async fn on_publish(&mut self, topic: &str, body: &[u8]) -> Vec<Outgoing> {
        let Some((namespace, name, request)) = payload::parse_topic(topic) else {
            tracing::debug!(
                topic,
                "ignoring a publish on a topic that is no device request"
            );
            return Vec::new();
        };
        match request {
            Request::TwinUpdate => self.twin_update(namespace, name, body).await,
            Request::TwinGet => vec![self.twin_get(namespace, name, body)],
            Request::StateUpdate => self.state_update(namespace, name, body).await,
        }
    }

    async fn twin_update(&mut self, namespace: &str, name: &str, body: &[u8]) -> Vec<Outgoing> {
        const SUFFIX: &str = payload::TWIN_UPDATE_RESULT;
        let message: TwinMessage = match decode(namespace, name, SUFFIX, body, "a twin update") {
            Ok(m) => m,
            Err(refusal) => return vec![*refusal],
        };
        let event_id = message.base.event_id;
        let refuse = |code, reason: String| {
            vec![Outgoing::error(
                namespace,
                name,
                SUFFIX,
                event_id.clone(),
                code,
                reason,
            )]
        };
        let Some(twins) = message.twin else {
            return refuse(BAD_REQUEST, "the update has no twin".into());
        };
        let Some(view) = self.devices.twin(namespace, name) else {
            return refuse(
                NOT_FOUND,
                format!("device {namespace}/{name} is not on this node"),
            );
        };
        let mut reported = Vec::new();
        for (property, twin) in &twins {
            let Some(twin) = twin else {
                return refuse(
                    BAD_REQUEST,
                    format!(
                        "property {property:?}: twins are not deleted over MQTT; the Device's spec lists its properties"
                    ),
                );
            };
            if twin.expected.is_some() {
                return refuse(
                    BAD_REQUEST,
                    format!(
                        "property {property:?}: an expected value is not set over MQTT; set spec.properties[].desired of the Device in the API"
                    ),
                );
            }
            let Some(value) = twin.actual.as_ref().and_then(|a| a.value.clone()) else {
                return refuse(
                    BAD_REQUEST,
                    format!("property {property:?} has no actual value"),
                );
            };
            let Some(held) = view.properties.iter().find(|p| &p.name == property) else {
                return refuse(
                    NOT_FOUND,
                    format!("device {namespace}/{name} has no property {property:?}"),
                );
            };
            let given_type = twin
                .metadata
                .as_ref()
                .map(|m| m.type_.as_str())
                .unwrap_or_default();
            let type_ = if held.type_.is_empty() {
                given_type
            } else {
                held.type_.as_str()
            };
            if let Err(e) = payload::check_value(type_, &value) {
                return refuse(BAD_REQUEST, format!("property {property:?}: {e}"));
            }
            let mut metadata = std::collections::BTreeMap::new();
            if !given_type.is_empty() {
                metadata.insert("type".to_string(), given_type.to_string());
            }
            reported.push(Reported {
                property: property.clone(),
                value,
                metadata,
                observed_desired: None,
            });
        }
        if let Err(e) = self.devices.report(namespace, name, reported).await {
            return refuse(code_of(&e), e.to_string());
        }
        let after = self.devices.twin(namespace, name);
        let applied = twins
            .keys()
            .filter_map(|property| {
                let held = after
                    .as_ref()?
                    .properties
                    .iter()
                    .find(|p| &p.name == property)?;
                let reported = held.reported.as_ref()?;
                let message = MsgTwin {
                    actual: Some(TwinValue {
                        value: Some(reported.value.clone()),
                        metadata: reported
                            .metadata
                            .get("timestamp")
                            .and_then(|t| t.parse().ok())
                            .map(|timestamp| ValueMetadata { timestamp }),
                    }),
                    metadata: Some(TypeMetadata {
                        type_: payload::value_type(held),
                    }),
                    ..MsgTwin::default()
                };
                Some((property.clone(), Some(message)))
            })
            .collect();
        let result = TwinMessage {
            base: BaseMessage::answering(event_id.clone()),
            twin: Some(applied),
        };
        let mut out = vec![Outgoing::new(namespace, name, SUFFIX, &result)];
        out.extend(self.changed(namespace, name));
        out
    }

    fn twin_get(&self, namespace: &str, name: &str, body: &[u8]) -> Outgoing {
        const SUFFIX: &str = payload::TWIN_GET_RESULT;
        let base: BaseMessage = if body.iter().all(u8::is_ascii_whitespace) {
            BaseMessage::default()
        } else {
            match decode(namespace, name, SUFFIX, body, "a twin get") {
                Ok(b) => b,
                Err(refusal) => return *refusal,
            }
        };
        let Some(view) = self.devices.twin(namespace, name) else {
            let reason = format!("device {namespace}/{name} is not on this node");
            return Outgoing::error(namespace, name, SUFFIX, base.event_id, NOT_FOUND, reason);
        };
        let result = TwinMessage {
            base: BaseMessage::answering(base.event_id),
            twin: Some(payload::twins(&view)),
        };
        Outgoing::new(namespace, name, SUFFIX, &result)
    }

    async fn state_update(&mut self, namespace: &str, name: &str, body: &[u8]) -> Vec<Outgoing> {
        const SUFFIX: &str = payload::STATE_UPDATE_RESULT;
        let update: StateUpdate = match decode(namespace, name, SUFFIX, body, "a state update") {
            Ok(u) => u,
            Err(refusal) => return vec![*refusal],
        };
        let event_id = update.base.event_id;
        let Some(state) = normalize_state(&update.state) else {
            let reason = format!(
                "state {:?} is not one of {}",
                update.state.chars().take(64).collect::<String>(),
                STATES.join(", ")
            );
            return vec![Outgoing::error(
                namespace,
                name,
                SUFFIX,
                event_id,
                BAD_REQUEST,
                reason,
            )];
        };
        if let Err(e) = self.devices.set_state(namespace, name, &state).await {
            return vec![Outgoing::error(
                namespace,
                name,
                SUFFIX,
                event_id,
                code_of(&e),
                e.to_string(),
            )];
        }
        let mut out = Vec::new();
        if let Some(view) = self.devices.twin(namespace, name) {
            // The answer is the state message; `changed` must not send a second one.
            out.push(state_result(&view, event_id));
            if let Some(last) = self
                .last
                .get_mut(&(namespace.to_string(), name.to_string()))
            {
                last.state = view.state.clone();
                last.last_online_time = view.last_online_time.clone();
            }
        }
        out.extend(self.changed(namespace, name));
        out
    }

    /// What to publish after `namespace/name` may have changed: the document of the changed
    /// properties, and the state when it changed.
    pub fn changed(&mut self, namespace: &str, name: &str) -> Vec<Outgoing> {
        let key = (namespace.to_string(), name.to_string());
        let Some(after) = self.devices.twin(namespace, name) else {
            self.last.remove(&key);
            return Vec::new();
        };
        let before = self.last.get(&key);
        let mut out = Vec::new();
        if let Some(document) = payload::document(before, &after) {
            out.push(Outgoing::new(
                namespace,
                name,
                payload::TWIN_DOCUMENT,
                &document,
            ));
        }
        let state_changed = before.is_none_or(|b| b.state != after.state);
        if state_changed && !after.state.is_empty() {
            out.push(state_result(&after, uuid::Uuid::new_v4().to_string()));
        }
        self.last.insert(key, after);
        out
    }

    /// What to publish for a change of the node's devices.
    pub fn on_event(&mut self, event: &DeviceEvent) -> Vec<Outgoing> {
        match event {
            DeviceEvent::DeviceUpserted {
                device,
                desired_changed,
                ..
            } => {
                let (namespace, name) = (device.namespace(), device.name());
                let mut out = self.changed(namespace, name);
                if !desired_changed.is_empty() {
                    let delta = self
                        .devices
                        .twin(namespace, name)
                        .and_then(|view| payload::delta(&view));
                    if let Some(delta) = delta {
                        out.push(Outgoing::new(namespace, name, payload::TWIN_DELTA, &delta));
                    }
                }
                out
            }
            DeviceEvent::DeviceRemoved {
                namespace, name, ..
            } => {
                self.last.remove(&(namespace.clone(), name.clone()));
                Vec::new()
            }
            DeviceEvent::ModelUpserted(_) | DeviceEvent::ModelRemoved { .. } => Vec::new(),
        }
    }

    /// Compares every device again (after missed events).
    pub fn resync(&mut self) -> Vec<Outgoing> {
        let held: Vec<(String, String)> = self
            .devices
            .devices()
            .iter()
            .map(|d| (d.namespace().to_string(), d.name().to_string()))
            .collect();
        self.last.retain(|key, _| held.contains(key));
        held.iter()
            .flat_map(|(namespace, name)| self.changed(namespace, name))
            .collect()
    }
}

fn state_result(view: &TwinView, event_id: String) -> Outgoing {
    let result = StateResult {
        base: BaseMessage::answering(event_id),
        device: DeviceState {
            name: view.name.clone(),
            state: view.state.clone(),
            last_online_time: view.last_online_time.clone(),
        },
    };
    Outgoing::new(
        &view.namespace,
        &view.name,
        payload::STATE_UPDATE_RESULT,
        &result,
    )
}

/// What the event loop task hands the speaking task.
enum Inbound {
    Connected,
    Publish { topic: String, payload: Vec<u8> },
}

/// Speaks the device topics on `broker` until `shutdown`, reconnecting as needed.
pub async fn run(broker: String, devices: Devices, notices: Notices, shutdown: CancellationToken) {
    run_with(broker, devices, notices, shutdown).await
}

/// `run` over any `DeviceAccess`.
pub async fn run_with<D: DeviceAccess>(
    broker: String,
    devices: D,
    notices: Notices,
    shutdown: CancellationToken,
) {
    let (host, port) = match parse_broker(&broker) {
        Ok(address) => address,
        Err(e) => {
            tracing::error!(error = %e, "MQTT is off");
            return;
        }
    };
    let client_id = format!(
        "edgecore-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (client, eventloop) = AsyncClient::new(options, 256);
    // The event loop runs in its own task, so publishing never waits on it and its `poll` is
    // never dropped halfway; it hands connections and publishes over this channel.
    let (inbound_tx, mut inbound) = mpsc::channel(256);
    let connected = Arc::new(AtomicBool::new(false));
    tokio::spawn(poll(
        eventloop,
        inbound_tx,
        connected.clone(),
        broker.clone(),
        shutdown.clone(),
    ));

    // Subscribe before reading the twins, so no change falls between.
    let mut events = devices.subscribe();
    let mut notices = notices.subscribe();
    let mut speaker = Speaker::new(devices);
    loop {
        let out = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(message) = inbound.recv() => match message {
                Inbound::Connected => {
                    let filters = payload::SUBSCRIPTIONS
                        .iter()
                        .map(|t| SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(filters).await {
                        tracing::warn!(error = %e, "cannot subscribe to the device topics");
                    }
                    Vec::new()
                }
                Inbound::Publish { topic, payload } => speaker.on_publish(&topic, &payload).await,
            },
            event = events.recv() => match event {
                Ok(event) => speaker.on_event(&event),
                Err(broadcast::error::RecvError::Lagged(_)) => speaker.resync(),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            notice = notices.recv() => match notice {
                Ok((namespace, name)) => speaker.changed(&namespace, &name),
                Err(broadcast::error::RecvError::Lagged(_)) => speaker.resync(),
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        if !connected.load(Ordering::Relaxed) {
            continue;
        }
        for message in out {
            if let Err(e) =
                client.try_publish(message.topic, QoS::AtLeastOnce, false, message.payload)
            {
                tracing::debug!(error = %e, "MQTT publish dropped");
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Drives the MQTT connection: reconnects forever with a doubling delay (at most 30 s).
async fn poll(
    mut eventloop: EventLoop,
    inbound: mpsc::Sender<Inbound>,
    connected: Arc<AtomicBool>,
    broker: String,
    shutdown: CancellationToken,
) {
    let first = Duration::from_millis(500);
    let mut delay = first;
    let mut warned = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(broker = %broker, "connected to the MQTT broker");
                connected.store(true, Ordering::Relaxed);
                delay = first;
                warned = false;
                if inbound.send(Inbound::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let message = Inbound::Publish {
                    topic: String::from_utf8_lossy(publish.topic.as_ref()).into_owned(),
                    payload: publish.payload.to_vec(),
                };
                if inbound.send(message).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = connected.swap(false, Ordering::Relaxed);
                if was_connected || !warned {
                    tracing::warn!(broker = %broker, error = %e, "MQTT broker unreachable; retrying");
                    warned = true;
                } else {
                    tracing::debug!(broker = %broker, error = %e, retry_in = ?delay, "MQTT broker still unreachable");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// `body` as a `T`, or the 400 answer on `suffix` naming what the payload should have been.
fn decode<T: serde::de::DeserializeOwned>(
    namespace: &str,
    name: &str,
    suffix: &str,
    body: &[u8],
    what: &str,
) -> Result<T, Box<Outgoing>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(Outgoing::error(
            namespace,
            name,
            suffix,
            String::new(),
            BAD_REQUEST,
            format!("payload is not {what}: {e}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use devices::{Device, DeviceModel};
    use serde_json::{Value, json};

    use super::*;
    use crate::devices::dmi::fake::FakeDevices;

    fn node() -> FakeDevices {
        let devices = FakeDevices::new();
        let model: DeviceModel = serde_json::from_value(json!({
            "metadata": {"name": "model", "namespace": "plant"},
            "spec": {"protocol": "modbus", "properties": [
                {"name": "temperature", "type": "INT", "accessMode": "ReadWrite"},
                {"name": "label", "type": "STRING", "accessMode": "ReadOnly"}]}
        }))
        .expect("model");
        devices.put_model(model);
        devices.put_device(device("20"));
        devices
    }

    fn device(desired: &str) -> Device {
        serde_json::from_value(json!({
            "metadata": {"name": "m1", "namespace": "plant"},
            "spec": {"deviceModelRef": {"name": "model"}, "nodeName": "edge-1",
                     "protocol": {"protocolName": "modbus"},
                     "properties": [{"name": "temperature", "desired": {"value": desired}},
                                    {"name": "label"}]}
        }))
        .expect("device")
    }

    const BASE: &str = "$hw/events/device/plant/m1/";

    fn body(out: &Outgoing) -> Value {
        serde_json::from_slice(&out.payload).expect("JSON")
    }

    fn only<'a>(out: &'a [Outgoing], suffix: &str) -> &'a Outgoing {
        let found: Vec<_> = out
            .iter()
            .filter(|o| o.topic == format!("{BASE}{suffix}"))
            .collect();
        assert_eq!(found.len(), 1, "one {suffix} in {out:?}");
        found[0]
    }

    #[tokio::test]
    async fn an_actual_value_becomes_the_reported_twin_and_is_answered() {
        let devices = node();
        let mut speaker = Speaker::new(devices.clone());
        let request = json!({"event_id": "e1", "timestamp": 1,
                             "twin": {"temperature": {"actual": {"value": "21"},
                                                      "metadata": {"type": "int"}}}});
        let out = speaker
            .on_publish(
                &format!("{BASE}twin/update"),
                request.to_string().as_bytes(),
            )
            .await;
        let reports = devices.reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].2[0].value, "21");
        assert_eq!(reports[0].2[0].metadata["type"], "int");

        let result = body(only(&out, "twin/update/result"));
        assert_eq!(result["event_id"], "e1");
        assert_eq!(result["twin"]["temperature"]["actual"]["value"], "21");
        assert!(result.get("code").is_none(), "{result}");
        let document = body(only(&out, "twin/update/document"));
        assert_eq!(
            document["twin"]["temperature"]["last"]["actual"],
            Value::Null
        );
        assert_eq!(
            document["twin"]["temperature"]["current"]["actual"]["value"],
            "21"
        );
        assert_eq!(
            document["twin"]["temperature"]["current"]["expected"]["value"],
            "20"
        );
        assert!(document["twin"].get("label").is_none(), "only what changed");
    }

    #[tokio::test]
    async fn bad_updates_are_answered_with_a_code_and_change_nothing() {
        let devices = node();
        let mut speaker = Speaker::new(devices.clone());
        let cases: [(&str, &[u8], i64, &str); 8] = [
            ("twin/update", b"not json", 400, "not a twin update"),
            ("twin/update", br#"{"event_id": "e"}"#, 400, "no twin"),
            (
                "twin/update",
                br#"{"twin": {"temperature": {"expected": {"value": "1"}}}}"#,
                400,
                "spec.properties[].desired",
            ),
            (
                "twin/update",
                br#"{"twin": {"temperature": {"actual": {"value": "hot"}}}}"#,
                400,
                "not a valid INT",
            ),
            (
                "twin/update",
                br#"{"twin": {"temperature": null}}"#,
                400,
                "not deleted",
            ),
            (
                "twin/update",
                br#"{"twin": {"pressure": {"actual": {"value": "1"}}}}"#,
                404,
                "pressure",
            ),
            (
                "twin/update",
                br#"{"twin": {"temperature": {"metadata": {"type": "int"}}}}"#,
                400,
                "no actual value",
            ),
            ("state/update", br#"{"state": "sleepy"}"#, 400, "not one of"),
        ];
        for (suffix, payload, code, reason) in cases {
            let out = speaker
                .on_publish(&format!("{BASE}{suffix}"), payload)
                .await;
            let result = body(only(&out, &format!("{suffix}/result")));
            assert_eq!(result["code"], code, "{result}");
            let text = result["reason"].as_str().expect("a reason");
            assert!(text.contains(reason), "{reason:?} in {text:?}");
        }
        let out = speaker
            .on_publish(
                "$hw/events/device/plant/ghost/twin/update",
                br#"{"twin": {}}"#,
            )
            .await;
        assert_eq!(out.len(), 1);
        assert_eq!(body(&out[0])["code"], 404);
        assert!(devices.reports().is_empty(), "nothing refused was recorded");
        assert!(devices.state_of("plant", "m1").is_none());
    }

    #[tokio::test]
    async fn get_answers_the_whole_twin() {
        let devices = node();
        let mut speaker = Speaker::new(devices.clone());
        let out = speaker
            .on_publish(&format!("{BASE}twin/get"), br#"{"event_id": "g1"}"#)
            .await;
        let result = body(only(&out, "twin/get/result"));
        assert_eq!(result["event_id"], "g1");
        assert_eq!(result["twin"]["temperature"]["expected"]["value"], "20");
        assert_eq!(result["twin"]["temperature"]["metadata"]["type"], "int");
        assert_eq!(result["twin"]["label"]["metadata"]["type"], "string");
        let out = speaker
            .on_publish("$hw/events/device/plant/ghost/twin/get", b"")
            .await;
        assert_eq!(body(&out[0])["code"], 404);
    }

    #[tokio::test]
    async fn a_state_update_is_recorded_and_answered_once() {
        let devices = node();
        let mut speaker = Speaker::new(devices.clone());
        let out = speaker
            .on_publish(
                &format!("{BASE}state/update"),
                br#"{"event_id": "s1", "state": "Online"}"#,
            )
            .await;
        assert_eq!(devices.state_of("plant", "m1").as_deref(), Some("online"));
        let result = body(only(&out, "state/update/result"));
        assert_eq!(result["event_id"], "s1");
        assert_eq!(result["device"]["name"], "m1");
        assert_eq!(result["device"]["state"], "online");
    }

    #[tokio::test]
    async fn a_desired_change_publishes_the_delta_and_the_document() {
        let devices = node();
        let mut speaker = Speaker::new(devices.clone());
        let mut events = devices.subscribe();
        devices.put_device(device("25"));
        let event = events.recv().await.expect("an event");
        let out = speaker.on_event(&event);
        let delta = body(only(&out, "twin/update/delta"));
        assert_eq!(delta["delta"]["temperature"], "25");
        assert_eq!(delta["twin"]["temperature"]["expected"]["value"], "25");
        let document = body(only(&out, "twin/update/document"));
        assert_eq!(
            document["twin"]["temperature"]["last"]["expected"]["value"],
            "20"
        );
        assert_eq!(
            document["twin"]["temperature"]["current"]["expected"]["value"],
            "25"
        );
    }

    #[tokio::test]
    async fn changes_made_through_dmi_are_published_once() {
        let devices = node();
        let mut speaker = Speaker::new(devices.clone());
        let reported = Reported {
            property: "temperature".into(),
            value: "19".into(),
            metadata: Default::default(),
            observed_desired: None,
        };
        devices
            .report("plant", "m1", vec![reported])
            .await
            .expect("reports");
        devices.set_state("plant", "m1", "ok").await.expect("sets");
        let out = speaker.changed("plant", "m1");
        let document = body(only(&out, "twin/update/document"));
        assert_eq!(
            document["twin"]["temperature"]["current"]["actual"]["value"],
            "19"
        );
        assert_eq!(
            body(only(&out, "state/update/result"))["device"]["state"],
            "ok"
        );
        assert!(speaker.changed("plant", "m1").is_empty(), "nothing new");
    }

    #[test]
    fn broker_addresses_are_tcp_host_port() {
        assert_eq!(
            parse_broker("tcp://127.0.0.1:1883"),
            Ok(("127.0.0.1".into(), 1883))
        );
        assert_eq!(parse_broker("tcp://[::1]:1883"), Ok(("::1".into(), 1883)));
        for bad in [
            "127.0.0.1:1883",
            "tcp://host",
            "tcp://:1883",
            "tcp://h:0",
            "ssl://h:1",
        ] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
    }

    /// A real mosquitto on a free loopback port, stopped on drop.
    struct Broker {
        child: std::process::Child,
        _dir: tempfile::TempDir,
    }

    impl Broker {
        fn start(port: u16) -> Broker {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(
                &config,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
            )
            .expect("writes the config");
            let child = std::process::Command::new("mosquitto")
                .arg("-c")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mosquitto (Debian package mosquitto) must be installed for this test");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Broker { child, _dir: dir }
        }
    }

    impl Drop for Broker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// Publishes `payload` on `topic` with mosquitto_pub until mosquitto_sub sees a message on
    /// `answer` (edgecore may not have subscribed yet), and returns that message.
    async fn ask(port: u16, topic: &str, payload: &str, answer: &str) -> Value {
        let port_text = port.to_string();
        let sub = tokio::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port_text,
                "-t",
                answer,
                "-C",
                "1",
                "-W",
                "20",
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients) must be installed");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting = tokio::spawn(sub.wait_with_output());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !waiting.is_finished() && tokio::time::Instant::now() < deadline {
            let status = tokio::process::Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port_text,
                    "-t",
                    topic,
                    "-m",
                    payload,
                ])
                .status()
                .await
                .expect("mosquitto_pub runs");
            assert!(status.success() || !waiting.is_finished());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let output = waiting.await.expect("joins").expect("mosquitto_sub ran");
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("no answer on {answer}: {e}: {:?}", output))
    }

    #[tokio::test]
    async fn the_client_speaks_through_a_real_broker_and_comes_back_after_it_restarts() {
        let port = free_port();
        let broker = Broker::start(port);
        let devices = node();
        let shutdown = CancellationToken::new();
        tokio::spawn(run_with(
            format!("tcp://127.0.0.1:{port}"),
            devices.clone(),
            Notices::new(),
            shutdown.clone(),
        ));
        let result = ask(
            port,
            &format!("{BASE}twin/update"),
            r#"{"event_id": "u1", "twin": {"temperature": {"actual": {"value": "23"}}}}"#,
            &format!("{BASE}twin/update/result"),
        )
        .await;
        assert_eq!(
            result["twin"]["temperature"]["actual"]["value"], "23",
            "{result}"
        );
        assert_eq!(
            devices
                .reports()
                .last()
                .map(|r| r.2[0].value.clone())
                .as_deref(),
            Some("23")
        );

        // The broker goes away and comes back on the same port: edgecore reconnects and
        // subscribes again.
        drop(broker);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _broker = Broker::start(port);
        let result = ask(
            port,
            &format!("{BASE}twin/get"),
            r#"{"event_id": "g2"}"#,
            &format!("{BASE}twin/get/result"),
        )
        .await;
        assert_eq!(result["event_id"], "g2");
        assert_eq!(
            result["twin"]["temperature"]["actual"]["value"], "23",
            "{result}"
        );
        shutdown.cancel();
    }
}
