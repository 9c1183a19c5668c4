//! KubeEdge's device topics and their JSON payloads (v1.21: `edge/pkg/devicetwin/dttype`,
//! `dtcommon`): the topic names with the namespace in them, `event_id`/`timestamp` on every
//! message, twins as `{expected, actual, metadata: {type}}` with values as strings and
//! timestamps as milliseconds since the epoch (numbers), results with `code`/`reason` on
//! failure.

use std::collections::BTreeMap;

use devices::TwinProperty;
use serde::{Deserialize, Serialize};

use crate::devices::{PropertyTwin, TwinView};

/// Every device topic starts with this; then `{namespace}/{name}/` and a suffix.
pub const PREFIX: &str = "$hw/events/device/";
pub const TWIN_UPDATE: &str = "twin/update";
pub const TWIN_UPDATE_RESULT: &str = "twin/update/result";
pub const TWIN_GET: &str = "twin/get";
pub const TWIN_GET_RESULT: &str = "twin/get/result";
pub const TWIN_DELTA: &str = "twin/update/delta";
pub const TWIN_DOCUMENT: &str = "twin/update/document";
pub const STATE_UPDATE: &str = "state/update";
pub const STATE_UPDATE_RESULT: &str = "state/update/result";

/// What edgecore subscribes to.
pub const SUBSCRIPTIONS: [&str; 3] = [
    "$hw/events/device/+/+/twin/update",
    "$hw/events/device/+/+/twin/get",
    "$hw/events/device/+/+/state/update",
];

/// KubeEdge's result codes.
pub const BAD_REQUEST: i32 = 400;
pub const NOT_FOUND: i32 = 404;
pub const INTERNAL_ERROR: i32 = 500;

/// What a client asks on a topic edgecore subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    TwinUpdate,
    TwinGet,
    StateUpdate,
}

/// `$hw/events/device/{namespace}/{name}/{suffix}`.
pub fn topic(namespace: &str, name: &str, suffix: &str) -> String {
    format!("{PREFIX}{namespace}/{name}/{suffix}")
}

/// The device and request of a topic edgecore subscribes to; `None` for any other topic.
pub fn parse_topic(topic: &str) -> Option<(&str, &str, Request)> {
    let rest = topic.strip_prefix(PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let namespace = parts.next().filter(|s| !s.is_empty())?;
    let name = parts.next().filter(|s| !s.is_empty())?;
    let request = match parts.next()? {
        TWIN_UPDATE => Request::TwinUpdate,
        TWIN_GET => Request::TwinGet,
        STATE_UPDATE => Request::StateUpdate,
        _ => return None,
    };
    Some((namespace, name, request))
}

/// `event_id` and `timestamp` (ms since the epoch), on every message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BaseMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
}

impl BaseMessage {
    /// A message of edgecore's own, with a fresh event id.
    pub fn new() -> BaseMessage {
        BaseMessage::answering(uuid::Uuid::new_v4().to_string())
    }

    /// An answer to the event `event_id`.
    pub fn answering(event_id: String) -> BaseMessage {
        BaseMessage {
            event_id,
            timestamp: now_ms(),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueMetadata {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timestamp: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ValueMetadata>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeMetadata {
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub type_: String,
}

/// One property's twin in a message (KubeEdge's `MsgTwin`; its versions are not used here).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
}

/// `…/twin/update` (in) and `…/twin/update/result`, `…/twin/get/result` (out).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinMessage {
    #[serde(flatten)]
    pub base: BaseMessage,
    /// A `null` entry asks KubeEdge to delete the twin.
    #[serde(default)]
    pub twin: Option<BTreeMap<String, Option<MsgTwin>>>,
}

/// `…/twin/update/delta`: the twins with an expected value, and the expected values that
/// differ from the actual ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinDelta {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, MsgTwin>,
    pub delta: BTreeMap<String, String>,
}

/// One property in `…/twin/update/document`: before and after the change (`null` when absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinDoc {
    pub last: Option<MsgTwin>,
    pub current: Option<MsgTwin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinDocument {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, TwinDoc>,
}

/// A failed request's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResult {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub code: i32,
    pub reason: String,
}

/// `…/state/update` (in).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateUpdate {
    #[serde(flatten)]
    pub base: BaseMessage,
    #[serde(default)]
    pub state: String,
}

/// `…/state/update/result` (out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateResult {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub device: DeviceState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceState {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online_time: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A value as a message carries it; an empty value is no value (as in KubeEdge).
fn twin_value(value: Option<&TwinProperty>) -> Option<TwinValue> {
    let value = value.filter(|v| !v.value.is_empty())?;
    Some(TwinValue {
        value: Some(value.value.clone()),
        metadata: value
            .metadata
            .get("timestamp")
            .and_then(|t| t.parse().ok())
            .map(|timestamp| ValueMetadata { timestamp }),
    })
}

/// A property's value type as KubeEdge's twins name it: the type the mapper reported, else
/// the model's in lowercase (`int`, `float`, ...), else `string`.
pub fn value_type(property: &PropertyTwin) -> String {
    let reported = property
        .reported
        .as_ref()
        .and_then(|r| r.metadata.get("type"))
        .filter(|t| !t.is_empty());
    match reported {
        Some(t) => t.to_ascii_lowercase(),
        None if !property.type_.is_empty() => property.type_.to_ascii_lowercase(),
        None => "string".to_string(),
    }
}

/// A property's twin as a message carries it: `expected` is the desired value (the Device's
/// spec), `actual` the reported one.
pub fn msg_twin(property: &PropertyTwin) -> MsgTwin {
    MsgTwin {
        expected: twin_value(property.desired.as_ref()),
        actual: twin_value(property.reported.as_ref()),
        optional: None,
        metadata: Some(TypeMetadata {
            type_: value_type(property),
        }),
    }
}

/// Every twin of a device (`…/twin/get/result`).
pub fn twins(view: &TwinView) -> BTreeMap<String, Option<MsgTwin>> {
    view.properties
        .iter()
        .map(|p| (p.name.clone(), Some(msg_twin(p))))
        .collect()
}

/// The delta of a device, or `None` when every expected value equals the actual one.
pub fn delta(view: &TwinView) -> Option<TwinDelta> {
    let mut twin = BTreeMap::new();
    let mut delta = BTreeMap::new();
    for property in &view.properties {
        let message = msg_twin(property);
        let Some(expected) = message.expected.as_ref().and_then(|e| e.value.clone()) else {
            continue;
        };
        let actual = message.actual.as_ref().and_then(|a| a.value.as_deref());
        if actual != Some(expected.as_str()) {
            delta.insert(property.name.clone(), expected);
        }
        twin.insert(property.name.clone(), message);
    }
    (!delta.is_empty()).then(|| TwinDelta {
        base: BaseMessage::new(),
        twin,
        delta,
    })
}

/// The properties whose twin differs between `before` and `after`, or `None` when none does.
pub fn document(before: Option<&TwinView>, after: &TwinView) -> Option<TwinDocument> {
    let mut twin = BTreeMap::new();
    for property in &after.properties {
        let last = before.and_then(|b| b.properties.iter().find(|p| p.name == property.name));
        if last.is_some_and(|last| {
            last.desired == property.desired
                && last.reported == property.reported
                && last.observed_desired == property.observed_desired
        }) {
            continue;
        }
        twin.insert(
            property.name.clone(),
            TwinDoc {
                last: last.map(msg_twin),
                current: Some(msg_twin(property)),
            },
        );
    }
    for last in before.map(|b| b.properties.as_slice()).unwrap_or_default() {
        if !after.properties.iter().any(|p| p.name == last.name) {
            twin.insert(
                last.name.clone(),
                TwinDoc {
                    last: Some(msg_twin(last)),
                    current: None,
                },
            );
        }
    }
    (!twin.is_empty()).then(|| TwinDocument {
        base: BaseMessage::new(),
        twin,
    })
}

/// Checks a value against its type as KubeEdge does (`dtcommon.ValidateValue`): integers for
/// `int`/`integer`, numbers for `float`/`double`, `true`/`false` for `boolean`; anything for
/// other types.
pub fn check_value(type_: &str, value: &str) -> Result<(), String> {
    if value.len() > crate::devices::dmi::MAX_VALUE {
        return Err(format!(
            "the value is longer than {} bytes",
            crate::devices::dmi::MAX_VALUE
        ));
    }
    let ok = match type_.to_ascii_lowercase().as_str() {
        "int" | "integer" => value.parse::<i64>().is_ok(),
        "float" | "double" => value.parse::<f64>().is_ok_and(f64::is_finite),
        "boolean" | "bool" => value == "true" || value == "false",
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid {type_} value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn property(name: &str, desired: &str, reported: &str) -> PropertyTwin {
        let value = |v: &str, ts: &str| {
            (!v.is_empty()).then(|| TwinProperty {
                value: v.to_string(),
                metadata: [("timestamp".to_string(), ts.to_string())].into(),
            })
        };
        PropertyTwin {
            name: name.to_string(),
            type_: "INT".to_string(),
            access_mode: "ReadWrite".to_string(),
            desired: value(desired, "100"),
            reported: value(reported, "200"),
            observed_desired: None,
        }
    }

    fn view(properties: Vec<PropertyTwin>) -> TwinView {
        TwinView {
            namespace: "plant".into(),
            name: "m1".into(),
            model: "model".into(),
            protocol: "modbus".into(),
            state: "ok".into(),
            last_online_time: String::new(),
            properties,
        }
    }

    #[test]
    fn topics_carry_the_namespace_as_in_kubeedge_1_21() {
        assert_eq!(
            topic("plant", "m1", TWIN_DELTA),
            "$hw/events/device/plant/m1/twin/update/delta"
        );
        let cases = [
            (
                "$hw/events/device/plant/m1/twin/update",
                Some(("plant", "m1", Request::TwinUpdate)),
            ),
            (
                "$hw/events/device/default/m1/twin/get",
                Some(("default", "m1", Request::TwinGet)),
            ),
            (
                "$hw/events/device/a/b/state/update",
                Some(("a", "b", Request::StateUpdate)),
            ),
            // Our own answers and other suffixes are not requests.
            ("$hw/events/device/a/b/twin/update/result", None),
            ("$hw/events/device/a/b/twin/update/delta", None),
            ("$hw/events/device/a/b/twin/cloud_updated", None),
            // Pre-namespace topics (KubeEdge before 1.15) name no device here.
            ("$hw/events/device/b/twin/update", None),
            ("$hw/events/device//b/twin/update", None),
            ("$hw/events/node/n/membership/get", None),
        ];
        for (topic, want) in cases {
            assert_eq!(parse_topic(topic), want, "{topic}");
        }
    }

    #[test]
    fn an_update_reads_as_kubeedge_clients_send_it() {
        let update: TwinMessage = serde_json::from_value(json!({
            "event_id": "e1", "timestamp": 1700000000000i64,
            "twin": {"temperature": {"actual": {"value": "21"}, "metadata": {"type": "int"}},
                     "gone": null}
        }))
        .expect("reads");
        assert_eq!(update.base.event_id, "e1");
        let twin = update.twin.expect("twin");
        let temperature = twin["temperature"].as_ref().expect("a twin");
        assert_eq!(
            temperature.actual.as_ref().and_then(|a| a.value.as_deref()),
            Some("21")
        );
        assert!(twin["gone"].is_none());
        // No event id, no timestamp: still a message.
        let bare: TwinMessage = serde_json::from_str("{}").expect("reads");
        assert!(bare.twin.is_none());
    }

    #[test]
    fn a_twin_is_written_with_kubeedge_names_and_number_timestamps() {
        let message = TwinMessage {
            base: BaseMessage::answering("e2".into()),
            twin: Some(twins(&view(vec![property("temperature", "30", "29")]))),
        };
        let value = serde_json::to_value(&message).expect("serializes");
        assert_eq!(value["event_id"], "e2");
        assert!(value["timestamp"].as_i64().expect("a number") > 0);
        let twin = &value["twin"]["temperature"];
        assert_eq!(twin["expected"]["value"], "30");
        assert_eq!(twin["expected"]["metadata"]["timestamp"], 100);
        assert_eq!(twin["actual"]["value"], "29");
        assert_eq!(twin["actual"]["metadata"]["timestamp"], 200);
        assert_eq!(twin["metadata"]["type"], "int");
    }

    #[test]
    fn the_delta_lists_the_expected_values_that_differ() {
        let v = view(vec![
            property("a", "30", "29"),
            property("b", "5", "5"),
            property("c", "", "7"),
        ]);
        let delta = delta(&v).expect("a differs");
        assert_eq!(delta.delta, BTreeMap::from([("a".into(), "30".into())]));
        assert_eq!(
            delta.twin.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "twins with an expected value"
        );
        assert!(super::delta(&view(vec![property("b", "5", "5")])).is_none());
    }

    #[test]
    fn the_document_holds_the_changed_properties_before_and_after() {
        let before = view(vec![property("a", "30", "29"), property("b", "5", "5")]);
        let after = view(vec![property("a", "30", "30"), property("b", "5", "5")]);
        let document = document(Some(&before), &after).expect("a changed");
        assert_eq!(document.twin.keys().collect::<Vec<_>>(), ["a"]);
        let doc = serde_json::to_value(&document.twin["a"]).expect("serializes");
        assert_eq!(doc["last"]["actual"]["value"], "29");
        assert_eq!(doc["current"]["actual"]["value"], "30");
        assert!(super::document(Some(&after), &after).is_none());
        let first = super::document(None, &after).expect("everything is new");
        assert_eq!(
            serde_json::to_value(&first.twin["b"]).expect("serializes")["last"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn values_are_checked_against_their_type() {
        assert!(check_value("int", "42").is_ok());
        assert!(check_value("INT", "4.2").is_err());
        assert!(check_value("float", "4.2").is_ok());
        assert!(check_value("double", "NaN").is_err());
        assert!(check_value("boolean", "true").is_ok());
        assert!(check_value("boolean", "yes").is_err());
        assert!(check_value("string", "anything at all").is_ok());
        let error = check_value("int", "x").expect_err("not an int");
        assert!(error.contains("int"), "{error}");
    }

    #[test]
    fn a_state_result_names_the_device() {
        let result = StateResult {
            base: BaseMessage::answering("e3".into()),
            device: DeviceState {
                name: "m1".into(),
                state: "online".into(),
                last_online_time: "2026-01-01T00:00:00Z".into(),
            },
        };
        let value = serde_json::to_value(&result).expect("serializes");
        assert_eq!(value["device"]["lastOnlineTime"], "2026-01-01T00:00:00Z");
        assert_eq!(value["device"]["state"], "online");
        let update: StateUpdate =
            serde_json::from_value(json!({"event_id": "x", "state": "offline"})).expect("reads");
        assert_eq!(update.state, "offline");
    }
}
