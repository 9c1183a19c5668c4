//! What a Device received over DMI means to this mapper: where the device is (`ip`, `port`,
//! `slaveID` in `spec.protocol.configData`), and per property the visitor (`register`,
//! `offset`, `limit`, `scale`, `isSwap`, `isRegisterSwap` in `visitors.configData`), its type
//! and access mode (from the DeviceModel), its desired value and its cycles.
//!
//! Parsed once, here, into [`DevicePlan`]; the device task only runs a plan. Numbers are
//! accepted as JSON numbers or as strings holding one (KubeEdge's edgecore sends whichever the
//! manifest had), booleans as booleans or `"true"`/`"false"`.

use std::time::Duration;

use dmi::pb;
use serde_json::{Map, Value};

use crate::codec::{Register, ValueType, Visitor};

/// Modbus TCP's port when `configData` names none.
pub const DEFAULT_PORT: u16 = 502;
/// A cycle of 0 (or none) means this (KubeEdge's rule).
pub const DEFAULT_CYCLE: Duration = Duration::from_secs(1);
/// No cycle is shorter than this, so a typo cannot flood a device.
pub const MIN_CYCLE: Duration = Duration::from_millis(10);

/// A field of a Device that this mapper cannot use, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device}: {field}: {problem}")]
pub struct PlanError {
    /// `namespace/name`.
    pub device: String,
    /// The field's path, e.g. `spec.properties[temperature].visitors.configData.register`.
    pub field: String,
    pub problem: String,
}

/// The Modbus TCP server a device is reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// The unit identifier (`slaveID`), 1 when not given.
    pub slave: u8,
}

/// Whether the mapper may write a property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

/// One property, ready to be read and written.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyPlan {
    pub name: String,
    pub visitor: Visitor,
    pub value_type: ValueType,
    pub access: Access,
    /// The desired value from the spec; `None` when empty.
    pub desired: Option<String>,
    pub collect_cycle: Duration,
    pub report_cycle: Duration,
    pub report_to_cloud: bool,
}

/// One device, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    pub namespace: String,
    pub name: String,
    pub endpoint: Endpoint,
    pub properties: Vec<PropertyPlan>,
}

impl DevicePlan {
    /// `namespace/name`, for logs and errors.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The namespace a DMI message names, `default` when empty.
pub fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}

/// Plans `device`, typed by `model` (the DeviceModel it references, if this mapper has it).
///
/// A device whose protocol configuration is unusable is refused; a property that is unusable
/// is left out and named in the second part of the result, so the others still run. Without
/// the model a property is typed by its desired value's `metadata.type`, else INT, and is not
/// written (its access mode is unknown); the device is planned again when the model arrives.
pub fn plan(
    device: &pb::Device,
    model: Option<&pb::DeviceModel>,
) -> Result<(DevicePlan, Vec<PlanError>), PlanError> {
    let namespace = namespace_or_default(&device.namespace).to_string();
    let id = format!("{namespace}/{}", device.name);
    let error = |field: &str, problem: String| PlanError {
        device: id.clone(),
        field: field.to_string(),
        problem,
    };
    if device.name.is_empty() {
        return Err(error("name", "empty".into()));
    }
    let spec = device.spec.clone().unwrap_or_default();
    let protocol = spec.protocol.unwrap_or_default();
    let config = dmi::convert::customized_to_json(protocol.config_data.as_ref())
        .map_err(|e| error("spec.protocol.configData", e.to_string()))?;
    let endpoint = endpoint(&config)
        .map_err(|(key, problem)| error(&format!("spec.protocol.configData.{key}"), problem))?;

    let mut properties = Vec::new();
    let mut skipped = Vec::new();
    for property in &spec.properties {
        let field = format!("spec.properties[{}]", property.name);
        match property_plan(property, model) {
            Ok(plan) => properties.push(plan),
            Err((key, problem)) => skipped.push(error(&format!("{field}.{key}"), problem)),
        }
    }
    Ok((
        DevicePlan {
            namespace,
            name: device.name.clone(),
            endpoint,
            properties,
        },
        skipped,
    ))
}

/// `(key, problem)` for a bad entry.
type FieldError = (String, String);

fn endpoint(config: &Map<String, Value>) -> Result<Endpoint, FieldError> {
    let host = match config.get("ip") {
        Some(Value::String(ip)) if !ip.trim().is_empty() => ip.trim().to_string(),
        Some(other) => return Err(("ip".into(), format!("want a host or address, got {other}"))),
        None => {
            return Err((
                "ip".into(),
                "missing (this mapper speaks Modbus TCP; serial devices are not supported)".into(),
            ));
        }
    };
    let port = optional_integer(config, "port", 1, u64::from(u16::MAX))?
        .map_or(DEFAULT_PORT, |p| p as u16);
    let slave = optional_integer(config, "slaveID", 0, 255)?.map_or(1, |s| s as u8);
    Ok(Endpoint { host, port, slave })
}

fn property_plan(
    property: &pb::DeviceProperty,
    model: Option<&pb::DeviceModel>,
) -> Result<PropertyPlan, FieldError> {
    if property.name.is_empty() {
        return Err(("name".into(), "empty".into()));
    }
    let model_property = model.and_then(|m| {
        m.spec
            .as_ref()
            .and_then(|s| s.properties.iter().find(|p| p.name == property.name))
    });
    let desired = property.desired.clone().unwrap_or_default();
    let (type_name, access) = match model_property {
        Some(p) => (
            p.r#type.clone(),
            if p.access_mode == devices::READ_WRITE {
                Access::ReadWrite
            } else {
                Access::ReadOnly
            },
        ),
        None => (
            desired
                .metadata
                .get("type")
                .cloned()
                .unwrap_or_else(|| "int".into()),
            Access::ReadOnly,
        ),
    };
    let value_type = ValueType::parse(&type_name).ok_or_else(|| {
        (
            "type".to_string(),
            format!("{type_name:?} is not a type a register holds (want INT, FLOAT, DOUBLE, BOOLEAN or STRING)"),
        )
    })?;
    let visitors = property.visitors.clone().unwrap_or_default();
    let config = dmi::convert::customized_to_json(visitors.config_data.as_ref())
        .map_err(|e| ("visitors.configData".to_string(), e.to_string()))?;
    let visitor = visitor(&config, value_type)
        .map_err(|(key, problem)| (format!("visitors.configData.{key}"), problem))?;
    Ok(PropertyPlan {
        name: property.name.clone(),
        visitor,
        value_type,
        access,
        desired: Some(desired.value).filter(|v| !v.is_empty()),
        collect_cycle: cycle(property.collect_cycle),
        report_cycle: cycle(property.report_cycle),
        report_to_cloud: property.report_to_cloud,
    })
}

fn visitor(config: &Map<String, Value>, value_type: ValueType) -> Result<Visitor, FieldError> {
    let register = match config.get("register") {
        Some(Value::String(name)) => Register::parse(name).ok_or_else(|| {
            (
                "register".to_string(),
                format!(
                    "{name:?} is not a register (want CoilRegister, DiscreteInputRegister, HoldingRegister or InputRegister)"
                ),
            )
        })?,
        Some(other) => return Err(("register".into(), format!("want a register name, got {other}"))),
        None => return Err(("register".into(), "missing".into())),
    };
    let offset = optional_integer(config, "offset", 0, u64::from(u16::MAX))?.unwrap_or(0) as u16;
    let limit = match optional_integer(config, "limit", 0, 125)? {
        None | Some(0) => value_type.default_limit(),
        Some(limit) => limit as u16,
    };
    let scale = match config.get("scale") {
        None => 1.0,
        Some(value) => match number(value) {
            Some(0.0) => 1.0,
            Some(scale) if scale.is_finite() => scale,
            _ => return Err(("scale".into(), format!("want a number, got {value}"))),
        },
    };
    Ok(Visitor {
        register,
        offset,
        limit,
        scale,
        swap: flag(config, "isSwap")?,
        register_swap: flag(config, "isRegisterSwap")?,
    })
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn optional_integer(
    config: &Map<String, Value>,
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, FieldError> {
    let Some(value) = config.get(key) else {
        return Ok(None);
    };
    match number(value) {
        Some(n) if n.fract() == 0.0 && n >= min as f64 && n <= max as f64 => Ok(Some(n as u64)),
        _ => Err((
            key.to_string(),
            format!("want an integer from {min} to {max}, got {value}"),
        )),
    }
}

fn flag(config: &Map<String, Value>, key: &str) -> Result<bool, FieldError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err((key.to_string(), format!("want true or false, got {other}"))),
    }
}

/// A Go `time.Duration` in nanoseconds; 0 or less is one second.
fn cycle(nanos: i64) -> Duration {
    if nanos <= 0 {
        return DEFAULT_CYCLE;
    }
    Duration::from_nanos(nanos as u64).max(MIN_CYCLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn customized(value: Value) -> Option<pb::CustomizedValue> {
        dmi::convert::customized_value(value.as_object())
    }

    fn device(protocol: Value, visitor: Value) -> pb::Device {
        pb::Device {
            name: "thermo".into(),
            namespace: String::new(),
            spec: Some(pb::DeviceSpec {
                device_model_reference: "model".into(),
                protocol: Some(pb::ProtocolConfig {
                    protocol_name: "modbus".into(),
                    config_data: customized(protocol),
                }),
                properties: vec![pb::DeviceProperty {
                    name: "temperature".into(),
                    desired: Some(pb::TwinProperty {
                        value: "20".into(),
                        metadata: Default::default(),
                    }),
                    visitors: Some(pb::VisitorConfig {
                        protocol_name: "modbus".into(),
                        config_data: customized(visitor),
                    }),
                    report_cycle: 0,
                    collect_cycle: 500_000_000,
                    report_to_cloud: true,
                    push_method: None,
                }],
                methods: vec![],
            }),
            status: None,
        }
    }

    fn model(type_: &str, access: &str) -> pb::DeviceModel {
        pb::DeviceModel {
            name: "model".into(),
            namespace: "default".into(),
            spec: Some(pb::DeviceModelSpec {
                properties: vec![pb::ModelProperty {
                    name: "temperature".into(),
                    r#type: type_.into(),
                    access_mode: access.into(),
                    ..Default::default()
                }],
                commands: vec![],
            }),
        }
    }

    #[test]
    fn a_kubeedge_modbus_device_plans() {
        let device = device(
            json!({"ip": "127.0.0.1", "port": 5020, "slaveID": 3}),
            json!({"register": "HoldingRegister", "offset": 2, "limit": 2, "scale": 0.5,
                   "isSwap": true, "isRegisterSwap": "false"}),
        );
        let (plan, skipped) = plan(&device, Some(&model("FLOAT", "ReadWrite"))).expect("plans");
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(plan.id(), "default/thermo");
        assert_eq!(
            plan.endpoint,
            Endpoint {
                host: "127.0.0.1".into(),
                port: 5020,
                slave: 3
            }
        );
        let property = &plan.properties[0];
        assert_eq!(
            property.visitor,
            Visitor {
                register: Register::Holding,
                offset: 2,
                limit: 2,
                scale: 0.5,
                swap: true,
                register_swap: false
            }
        );
        assert_eq!(property.value_type, ValueType::Float);
        assert_eq!(property.access, Access::ReadWrite);
        assert_eq!(property.desired.as_deref(), Some("20"));
        assert_eq!(property.collect_cycle, Duration::from_millis(500));
        assert_eq!(property.report_cycle, DEFAULT_CYCLE);
    }

    #[test]
    fn defaults_fill_what_a_manifest_leaves_out() {
        let device = device(
            json!({"ip": "plc.local"}),
            json!({"register": "CoilRegister"}),
        );
        let (plan, _) = plan(&device, None).expect("plans");
        assert_eq!(plan.endpoint.port, DEFAULT_PORT);
        assert_eq!(plan.endpoint.slave, 1);
        let property = &plan.properties[0];
        assert_eq!(property.visitor.limit, 1);
        assert_eq!(property.visitor.scale, 1.0);
        // Without the model the type comes from the desired value, else INT; nothing is written.
        assert_eq!(property.value_type, ValueType::Int);
        assert_eq!(property.access, Access::ReadOnly);
    }

    #[test]
    fn a_bad_property_is_named_and_the_others_run() {
        let mut device = device(
            json!({"ip": "127.0.0.1"}),
            json!({"register": "HoldingRegister"}),
        );
        let spec = device.spec.as_mut().expect("spec");
        let mut bad = spec.properties[0].clone();
        bad.name = "humidity".into();
        bad.visitors = Some(pb::VisitorConfig {
            protocol_name: "modbus".into(),
            config_data: customized(json!({"register": "Holding", "offset": 1})),
        });
        spec.properties.push(bad);
        let (plan, skipped) = plan(&device, None).expect("plans");
        assert_eq!(plan.properties.len(), 1);
        assert_eq!(
            skipped[0].to_string(),
            "device default/thermo: spec.properties[humidity].visitors.configData.register: \
             \"Holding\" is not a register (want CoilRegister, DiscreteInputRegister, HoldingRegister or InputRegister)"
        );
    }

    #[test]
    fn an_unusable_protocol_refuses_the_device() {
        let cases = [
            (
                json!({"serialPort": "/dev/ttyS0"}),
                "spec.protocol.configData.ip",
            ),
            (
                json!({"ip": "127.0.0.1", "port": 70000}),
                "spec.protocol.configData.port",
            ),
            (
                json!({"ip": "127.0.0.1", "slaveID": "x"}),
                "spec.protocol.configData.slaveID",
            ),
        ];
        for (protocol, field) in cases {
            let error = plan(
                &device(protocol, json!({"register": "HoldingRegister"})),
                None,
            )
            .expect_err("refused");
            assert_eq!(error.field, field);
        }
    }

    #[test]
    fn a_type_a_register_cannot_hold_is_refused() {
        let device = device(
            json!({"ip": "127.0.0.1"}),
            json!({"register": "HoldingRegister"}),
        );
        let (plan, skipped) = plan(&device, Some(&model("BYTES", "ReadOnly"))).expect("plans");
        assert!(plan.properties.is_empty());
        assert_eq!(skipped[0].field, "spec.properties[temperature].type");
    }
}
