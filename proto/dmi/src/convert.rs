//! Conversions between the API's `devices` types and DMI messages.
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
