//! Conversions between the API's `devices` types and DMI messages.
//!
//! `device` and `model` build what edgecore sends a mapper, field for field as KubeEdge's
//! edgecore builds it (v1.21 `dtcommon.ConvertDevice`/`ConvertDeviceModel`, which go through the
//! JSON of the API object): the spec with `deviceModelRef.name` as `deviceModelReference`, the
//! desired value and visitors of every property (always present, possibly empty), `pushMethod`
//! when set, the methods, and the status twins with `reportToCloud`/`reportCycle`. KubeEdge
//! matches JSON keys case-insensitively on that trip (`hostName` lands in `hostname`), and so
//! does `push_method` here.
//!
//! Free-form values (`configData`) travel as `google.protobuf.Any` holding a wrapper, as
//! KubeEdge's edgecore sends them: a JSON string as `StringValue`, an integer as `Int32Value`
//! when it fits (else `Int64Value`), a number with a fraction as `FloatValue`, a boolean as
//! `BoolValue`. Objects and arrays have no wrapper in KubeEdge's scheme; they travel as a
//! `StringValue` holding their JSON text (KubeEdge refuses them).

use prost::Message;
use prost_types::Any;
use serde_json::Value;

use crate::pb;

const STRING: &str = "type.googleapis.com/google.protobuf.StringValue";
const INT32: &str = "type.googleapis.com/google.protobuf.Int32Value";
const INT64: &str = "type.googleapis.com/google.protobuf.Int64Value";
const UINT32: &str = "type.googleapis.com/google.protobuf.UInt32Value";
const UINT64: &str = "type.googleapis.com/google.protobuf.UInt64Value";
const FLOAT: &str = "type.googleapis.com/google.protobuf.FloatValue";
const DOUBLE: &str = "type.googleapis.com/google.protobuf.DoubleValue";
const BOOL: &str = "type.googleapis.com/google.protobuf.BoolValue";

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("configData {key:?}: unsupported Any type {type_url:?}")]
    UnsupportedType { key: String, type_url: String },
    #[error("configData {key:?}: cannot decode {type_url:?}: {source}")]
    Decode {
        key: String,
        type_url: String,
        #[source]
        source: prost::DecodeError,
    },
}

fn pack<M: Message>(type_url: &str, message: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: message.encode_to_vec(),
    }
}

/// One JSON value as KubeEdge's edgecore packs it.
pub fn json_to_any(value: &Value) -> Any {
    match value {
        Value::String(s) => pack(STRING, &s.clone()),
        Value::Bool(b) => pack(BOOL, b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => pack(INT32, &small),
                    Err(_) => pack(INT64, &i),
                }
            } else if let Some(u) = n.as_u64() {
                pack(UINT64, &u)
            } else {
                pack(FLOAT, &(n.as_f64().unwrap_or_default() as f32))
            }
        }
        Value::Null => pack(STRING, &String::new()),
        other => pack(STRING, &other.to_string()),
    }
}

/// One `Any` back to JSON, for a mapper reading its configuration. `key` names the entry in
/// errors.
pub fn any_to_json(key: &str, any: &Any) -> Result<Value, ConvertError> {
    let decode_error = |source| ConvertError::Decode {
        key: key.to_string(),
        type_url: any.type_url.clone(),
        source,
    };
    let bytes = any.value.as_slice();
    Ok(match any.type_url.as_str() {
        STRING => Value::String(String::decode(bytes).map_err(decode_error)?),
        BOOL => Value::Bool(bool::decode(bytes).map_err(decode_error)?),
        INT32 => Value::from(i32::decode(bytes).map_err(decode_error)?),
        INT64 => Value::from(i64::decode(bytes).map_err(decode_error)?),
        UINT32 => Value::from(u32::decode(bytes).map_err(decode_error)?),
        UINT64 => Value::from(u64::decode(bytes).map_err(decode_error)?),
        FLOAT => Value::from(f64::from(f32::decode(bytes).map_err(decode_error)?)),
        DOUBLE => Value::from(f64::decode(bytes).map_err(decode_error)?),
        other => {
            return Err(ConvertError::UnsupportedType {
                key: key.to_string(),
                type_url: other.to_string(),
            });
        }
    })
}

/// A `configData` map as DMI carries it.
pub fn customized_value(
    data: Option<&serde_json::Map<String, Value>>,
) -> Option<pb::CustomizedValue> {
    data.map(|data| pb::CustomizedValue {
        data: data
            .iter()
            .map(|(k, v)| (k.clone(), json_to_any(v)))
            .collect(),
    })
}

/// A Device as edgecore sends it to a mapper (`RegisterDevice`, `UpdateDevice`,
/// `MapperRegister`'s answer).
pub fn device(device: &devices::Device) -> pb::Device {
    let spec = &device.spec;
    let status = device.status.clone().unwrap_or_default();
    pb::Device {
        name: device.name().to_string(),
        namespace: device.namespace().to_string(),
        spec: Some(pb::DeviceSpec {
            device_model_reference: device.model_name().unwrap_or_default().to_string(),
            protocol: Some(pb::ProtocolConfig {
                protocol_name: spec.protocol.protocol_name.clone(),
                config_data: customized_value(spec.protocol.config_data.as_ref()),
            }),
            properties: spec.properties.iter().map(property).collect(),
            methods: spec
                .methods
                .iter()
                .map(|m| pb::DeviceMethod {
                    name: m.name.clone(),
                    description: m.description.clone(),
                    property_names: m.property_names.clone(),
                })
                .collect(),
        }),
        status: Some(pb::DeviceStatus {
            twins: status
                .twins
                .iter()
                .map(|t| pb::Twin {
                    property_name: t.property_name.clone(),
                    observed_desired: Some(twin_property(&t.observed_desired)),
                    reported: Some(twin_property(&t.reported)),
                })
                .collect(),
            report_to_cloud: status.report_to_cloud,
            report_cycle: status.report_cycle,
        }),
    }
}

/// A DeviceModel as edgecore sends it to a mapper.
pub fn model(model: &devices::DeviceModel) -> pb::DeviceModel {
    pb::DeviceModel {
        name: model.name().to_string(),
        namespace: model.namespace().to_string(),
        spec: Some(pb::DeviceModelSpec {
            properties: model
                .spec
                .properties
                .iter()
                .map(|p| pb::ModelProperty {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    r#type: p.type_.clone(),
                    access_mode: p.access_mode.clone(),
                    minimum: p.minimum.clone(),
                    maximum: p.maximum.clone(),
                    unit: p.unit.clone(),
                })
                .collect(),
            commands: Vec::new(),
        }),
    }
}

/// A twin value as DMI carries it.
pub fn twin_property(value: &devices::TwinProperty) -> pb::TwinProperty {
    pb::TwinProperty {
        value: value.value.clone(),
        metadata: value
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// A DMI twin value back to the API's shape.
pub fn api_twin_property(value: &pb::TwinProperty) -> devices::TwinProperty {
    devices::TwinProperty {
        value: value.value.clone(),
        metadata: value
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn property(property: &devices::DeviceProperty) -> pb::DeviceProperty {
    pb::DeviceProperty {
        name: property.name.clone(),
        desired: Some(twin_property(&property.desired)),
        visitors: Some(pb::VisitorConfig {
            protocol_name: property.visitors.protocol_name.clone(),
            config_data: customized_value(property.visitors.config_data.as_ref()),
        }),
        report_cycle: property.report_cycle,
        collect_cycle: property.collect_cycle,
        report_to_cloud: property.report_to_cloud,
        push_method: property.push_method.as_ref().map(push_method),
    }
}

/// `pushMethod` from the API's JSON. Keys match case-insensitively (as Go's `encoding/json`
/// does on KubeEdge's trip through JSON); a value of the wrong JSON type is left at its default.
pub fn push_method(value: &Value) -> pb::PushMethod {
    pb::PushMethod {
        http: object(value, "http").map(|v| pb::PushMethodHttp {
            hostname: string(v, "hostname"),
            port: int(v, "port"),
            requestpath: string(v, "requestpath"),
            timeout: int(v, "timeout"),
        }),
        mqtt: object(value, "mqtt").map(|v| pb::PushMethodMqtt {
            address: string(v, "address"),
            topic: string(v, "topic"),
            qos: int(v, "qos") as i32,
            retained: field(v, "retained")
                .and_then(Value::as_bool)
                .unwrap_or_default(),
        }),
        otel: object(value, "otel").map(|v| pb::PushMethodOtel {
            endpoint_url: string(v, "endpointurl"),
        }),
        db_method: object(value, "dbmethod").map(|db| pb::DbMethod {
            influxdb2: object(db, "influxdb2").map(|v| pb::DbMethodInfluxdb2 {
                influxdb2_client_config: object(v, "influxdb2clientconfig").map(|c| {
                    pb::Influxdb2ClientConfig {
                        url: string(c, "url"),
                        org: string(c, "org"),
                        bucket: string(c, "bucket"),
                    }
                }),
                influxdb2_data_config: object(v, "influxdb2dataconfig").map(|c| {
                    pb::Influxdb2DataConfig {
                        measurement: string(c, "measurement"),
                        tag: field(c, "tag")
                            .and_then(Value::as_object)
                            .map(|tags| {
                                tags.iter()
                                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        field_key: string(c, "fieldkey"),
                    }
                }),
            }),
            redis: object(db, "redis").map(|v| pb::DbMethodRedis {
                redis_client_config: object(v, "redisclientconfig").map(|c| {
                    pb::RedisClientConfig {
                        addr: string(c, "addr"),
                        db: int(c, "db") as i32,
                        poolsize: int(c, "poolsize") as i32,
                        min_idle_conns: int(c, "minidleconns") as i32,
                    }
                }),
            }),
            tdengine: object(db, "tdengine").map(|v| pb::DbMethodTdEngine {
                td_engine_client_config: object(v, "tdengineclientconfig").map(|c| {
                    pb::TdEngineClientConfig {
                        addr: string(c, "addr"),
                        dbname: string(c, "dbname"),
                    }
                }),
            }),
            mysql: object(db, "mysql").map(|v| pb::DbMethodMySql {
                mysql_client_config: object(v, "mysqlclientconfig").map(|c| {
                    pb::MySqlClientConfig {
                        addr: string(c, "addr"),
                        database: string(c, "database"),
                        user_name: string(c, "username"),
                    }
                }),
            }),
        }),
        anomaly_detection: None,
    }
}

/// A key of a JSON object, matched as Go's `encoding/json` does: exactly first, then ignoring
/// case. `lower` is the key in lowercase.
fn field<'a>(value: &'a Value, lower: &str) -> Option<&'a Value> {
    let object = value.as_object()?;
    object
        .iter()
        .find(|(k, _)| k.as_str() == lower)
        .or_else(|| object.iter().find(|(k, _)| k.to_lowercase() == lower))
        .map(|(_, v)| v)
}

fn object<'a>(value: &'a Value, lower: &str) -> Option<&'a Value> {
    field(value, lower).filter(|v| v.is_object())
}

fn string(value: &Value, lower: &str) -> String {
    field(value, lower)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn int(value: &Value, lower: &str) -> i64 {
    field(value, lower)
        .and_then(Value::as_i64)
        .unwrap_or_default()
}

/// A `CustomizedValue` back to a JSON map.
pub fn customized_to_json(
    value: Option<&pb::CustomizedValue>,
) -> Result<serde_json::Map<String, Value>, ConvertError> {
    let mut out = serde_json::Map::new();
    if let Some(value) = value {
        for (k, v) in &value.data {
            out.insert(k.clone(), any_to_json(k, v)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_survive_the_trip_through_any() {
        for value in [
            json!("HoldingRegister"),
            json!(2),
            json!(true),
            json!(5_000_000_000i64),
        ] {
            let any = json_to_any(&value);
            assert_eq!(any_to_json("k", &any).expect("decodes"), value);
        }
        let any = json_to_any(&json!(0.5));
        assert_eq!(any.type_url, FLOAT);
        assert_eq!(any_to_json("k", &any).expect("decodes"), json!(0.5));
    }

    fn kubeedge_device() -> devices::Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1",
            "kind": "Device",
            "metadata": {"name": "beta1-device", "namespace": "plant"},
            "spec": {
                "deviceModelRef": {"name": "beta1-model"},
                "nodeName": "edge-1",
                "protocol": {"protocolName": "modbus",
                             "configData": {"ip": "127.0.0.1", "port": 5020, "slaveID": 1}},
                "properties": [{
                    "name": "temperature",
                    "desired": {"value": "30", "metadata": {"type": "int"}},
                    "visitors": {"protocolName": "modbus",
                                 "configData": {"register": "HoldingRegister", "offset": 2,
                                                "limit": 1, "scale": 0.1, "isSwap": true}},
                    "reportCycle": 10_000_000_000i64,
                    "collectCycle": 1_000_000_000i64,
                    "reportToCloud": true,
                    "pushMethod": {"mqtt": {"address": "tcp://127.0.0.1:1883", "topic": "t",
                                            "qos": 1, "retained": true},
                                   "http": {"hostName": "h", "port": 80, "requestPath": "/p"},
                                   "dbMethod": {"TDEngine": {"TDEngineClientConfig":
                                                             {"addr": "a", "dbName": "d"}}}}
                }, {"name": "switch"}],
                "methods": [{"name": "reset", "propertyNames": ["switch"]}]
            },
            "status": {"twins": [{"propertyName": "temperature",
                                  "reported": {"value": "29", "metadata": {"timestamp": "5"}}}],
                       "state": "ok"}
        }))
        .expect("KubeEdge's shape")
    }

    #[test]
    fn a_device_converts_as_kubeedge_converts_it() {
        let d = device(&kubeedge_device());
        assert_eq!(
            (d.name.as_str(), d.namespace.as_str()),
            ("beta1-device", "plant")
        );
        let spec = d.spec.expect("spec");
        assert_eq!(spec.device_model_reference, "beta1-model");
        let protocol = spec.protocol.expect("protocol");
        assert_eq!(protocol.protocol_name, "modbus");
        let config = customized_to_json(protocol.config_data.as_ref()).expect("decodes");
        assert_eq!(config["ip"], "127.0.0.1");
        assert_eq!(config["port"], 5020);
        assert_eq!(config["slaveID"], 1);

        let temperature = &spec.properties[0];
        assert_eq!(temperature.desired.as_ref().expect("desired").value, "30");
        assert_eq!(temperature.report_cycle, 10_000_000_000);
        assert_eq!(temperature.collect_cycle, 1_000_000_000);
        assert!(temperature.report_to_cloud);
        let visitors = temperature.visitors.as_ref().expect("visitors");
        let visitor = customized_to_json(visitors.config_data.as_ref()).expect("decodes");
        assert_eq!(visitor["register"], "HoldingRegister");
        assert_eq!(visitor["offset"], 2);
        assert_eq!(visitor["isSwap"], true);
        assert!((visitor["scale"].as_f64().expect("a number") - 0.1).abs() < 1e-6);
        let push = temperature.push_method.as_ref().expect("pushMethod");
        let mqtt = push.mqtt.as_ref().expect("mqtt");
        assert_eq!(
            (mqtt.topic.as_str(), mqtt.qos, mqtt.retained),
            ("t", 1, true)
        );
        let http = push.http.as_ref().expect("http");
        assert_eq!((http.hostname.as_str(), http.port), ("h", 80));
        assert_eq!(http.requestpath, "/p");
        let td = push
            .db_method
            .as_ref()
            .and_then(|db| db.tdengine.as_ref())
            .and_then(|t| t.td_engine_client_config.as_ref())
            .expect("TDEngine, matched ignoring case");
        assert_eq!(td.dbname, "d");

        // KubeEdge's trip through JSON gives every property a desired value and visitors.
        let switch = &spec.properties[1];
        assert_eq!(switch.desired.as_ref().map(|d| d.value.as_str()), Some(""));
        assert!(
            switch
                .visitors
                .as_ref()
                .expect("visitors")
                .config_data
                .is_none()
        );
        assert!(switch.push_method.is_none());
        assert_eq!(spec.methods[0].property_names, ["switch"]);

        let status = d.status.expect("status");
        assert_eq!(status.twins[0].property_name, "temperature");
        assert_eq!(
            status.twins[0].reported.as_ref().expect("reported").value,
            "29"
        );
    }

    #[test]
    fn a_device_without_protocol_data_or_status_still_has_the_parts_kubeedge_sends() {
        let d = device(&devices::Device::default());
        assert_eq!(d.namespace, "default");
        let spec = d.spec.expect("spec");
        assert!(spec.protocol.expect("protocol").config_data.is_none());
        assert!(d.status.expect("status").twins.is_empty());
    }

    #[test]
    fn a_model_converts_with_its_properties() {
        let m: devices::DeviceModel = serde_json::from_value(json!({
            "metadata": {"name": "beta1-model", "namespace": "plant"},
            "spec": {"protocol": "modbus", "properties": [{
                "name": "temperature", "description": "C", "type": "INT",
                "accessMode": "ReadWrite", "minimum": "0", "maximum": "100", "unit": "C"}]}
        }))
        .expect("model");
        let pb = model(&m);
        assert_eq!(
            (pb.name.as_str(), pb.namespace.as_str()),
            ("beta1-model", "plant")
        );
        let p = &pb.spec.expect("spec").properties[0];
        assert_eq!(
            (
                p.r#type.as_str(),
                p.access_mode.as_str(),
                p.maximum.as_str()
            ),
            ("INT", "ReadWrite", "100")
        );
    }

    #[test]
    fn an_unknown_any_type_is_named() {
        let any = Any {
            type_url: "type.googleapis.com/x.Y".into(),
            value: vec![],
        };
        let error = any_to_json("offset", &any).expect_err("unknown type");
        assert!(error.to_string().contains("offset"), "{error}");
    }
}
