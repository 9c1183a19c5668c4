//! apps/v1 (Deployment, ReplicaSet, DaemonSet, StatefulSet, ControllerRevision), batch/v1 (Job,
//! CronJob) and ServiceAccount objects as kube-apiserver's registry strategies shape them: the
//! defaults of each kind and of every pod template inside one, the Job's generated selector,
//! validation with kube-apiserver's field paths and messages, the update rules (immutable
//! selectors, what a StatefulSet or a Job may change, when a Deployment's generation moves) and
//! the ServiceAccount admission of pods.
//!
//! Hooked from [`super::objects::prepare_create`] and [`super::objects::prepare_update`]; the pod
//! template reuses the pod rules there ([`objects::default_pod_spec`], [`objects::validate_pod`])
//! so a template's containers get exactly what a pod's get. docs/workloads.md ("API objects")
//! lists where this differs from kube-apiserver.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::objects;
use super::resources::ResourceInfo;
use super::status::{ApiError, Cause};

/// The label kube-apiserver puts on a Job's pods (and in its generated selector): the Job's uid.
pub const JOB_CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// The label with the Job's name on its pods.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// The labels kube-apiserver still adds beside the two above, for older selectors.
const LEGACY_JOB_LABELS: [&str; 2] = ["controller-uid", "job-name"];
/// A CronJob's name is at most 52 characters: its Jobs append an 11-character suffix.
const CRONJOB_NAME_MAX: usize = 52;

/// The kinds with a pod template, and where the template is.
fn template_path(plural: &str) -> Option<&'static str> {
    match plural {
        "deployments" | "replicasets" | "daemonsets" | "statefulsets" | "jobs" => {
            Some("/spec/template")
        }
        "cronjobs" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// The template's field path in messages (`spec.template`).
fn template_field(plural: &str) -> &'static str {
    if plural == "cronjobs" {
        "spec.jobTemplate.spec.template"
    } else {
        "spec.template"
    }
}

fn is_apps(plural: &str) -> bool {
    matches!(
        plural,
        "deployments" | "replicasets" | "daemonsets" | "statefulsets"
    )
}

/// The object at `pointer`, made an object if it is absent (`null`); `None` when something of
/// another type is in the way (validation reports it).
fn object_at<'a>(value: &'a mut Value, pointer: &str) -> Option<&'a mut Map<String, Value>> {
    let mut at = value;
    for key in pointer.split('/').filter(|k| !k.is_empty()) {
        if at.is_null() {
            *at = json!({});
        }
        at = at.as_object_mut()?.entry(key).or_insert(Value::Null);
    }
    if at.is_null() {
        *at = json!({});
    }
    at.as_object_mut()
}

/// Sets the fields of `defaults` that `map` lacks (or holds as `null`).
fn fill(map: &mut Map<String, Value>, defaults: &[(&str, Value)]) {
    for (key, value) in defaults {
        let slot = map.entry(*key).or_insert(Value::Null);
        if slot.is_null() {
            *slot = value.clone();
        }
    }
}

/// kube-apiserver's defaults for `object` of `info` (applied on create and on every update,
/// as decoding does there): the kind's own and its pod template's. Other kinds are left alone.
pub fn default(info: &ResourceInfo, object: &mut Value) {
    if template_path(info.plural).is_none() {
        return;
    }
    let Some(spec) = object_at(object, "/spec") else {
        return;
    };
    match info.plural {
        "deployments" => {
            fill(
                spec,
                &[
                    ("replicas", json!(1)),
                    ("revisionHistoryLimit", json!(10)),
                    ("progressDeadlineSeconds", json!(600)),
                ],
            );
            if let Some(strategy) = object_at(object, "/spec/strategy") {
                fill(strategy, &[("type", json!("RollingUpdate"))]);
                if strategy["type"] == "RollingUpdate"
                    && let Some(rolling) = object_at(object, "/spec/strategy/rollingUpdate")
                {
                    fill(
                        rolling,
                        &[("maxUnavailable", json!("25%")), ("maxSurge", json!("25%"))],
                    );
                }
            }
        }
        "replicasets" => fill(spec, &[("replicas", json!(1))]),
        "daemonsets" => {
            fill(spec, &[("revisionHistoryLimit", json!(10))]);
            if let Some(strategy) = object_at(object, "/spec/updateStrategy") {
                fill(strategy, &[("type", json!("RollingUpdate"))]);
                if strategy["type"] == "RollingUpdate"
                    && let Some(rolling) = object_at(object, "/spec/updateStrategy/rollingUpdate")
                {
                    fill(
                        rolling,
                        &[("maxUnavailable", json!(1)), ("maxSurge", json!(0))],
                    );
                }
            }
        }
        "statefulsets" => {
            fill(
                spec,
                &[
                    ("replicas", json!(1)),
                    ("podManagementPolicy", json!("OrderedReady")),
                    ("revisionHistoryLimit", json!(10)),
                    ("serviceName", json!("")),
                    (
                        "persistentVolumeClaimRetentionPolicy",
                        json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                    ),
                ],
            );
            if let Some(strategy) = object_at(object, "/spec/updateStrategy") {
                fill(strategy, &[("type", json!("RollingUpdate"))]);
                if strategy["type"] == "RollingUpdate"
                    && let Some(rolling) = object_at(object, "/spec/updateStrategy/rollingUpdate")
                {
                    fill(rolling, &[("partition", json!(0))]);
                }
            }
        }
        "jobs" => {
            if spec.get("completions").is_none_or(Value::is_null)
                && spec.get("parallelism").is_none_or(Value::is_null)
            {
                spec.insert("completions".into(), json!(1));
            }
            let replacement = if spec.get("podFailurePolicy").is_some_and(|p| !p.is_null()) {
                "Failed"
            } else {
                "TerminatingOrFailed"
            };
            fill(
                spec,
                &[
                    ("parallelism", json!(1)),
                    ("backoffLimit", json!(6)),
                    ("completionMode", json!("NonIndexed")),
                    ("suspend", json!(false)),
                    ("manualSelector", json!(false)),
                    ("podReplacementPolicy", json!(replacement)),
                ],
            );
        }
        "cronjobs" => {
            fill(
                spec,
                &[
                    ("concurrencyPolicy", json!("Allow")),
                    ("suspend", json!(false)),
                    ("successfulJobsHistoryLimit", json!(3)),
                    ("failedJobsHistoryLimit", json!(1)),
                ],
            );
            // The Go structs are not pointers: an absent template metadata reads back as `{}`.
            object_at(object, "/spec/jobTemplate/metadata");
            object_at(object, "/spec/jobTemplate/spec/template/metadata");
        }
        _ => return,
    }
    if let Some(pointer) = template_path(info.plural) {
        default_template(info.plural, object, pointer);
    }
}

/// The pod defaults of a template's spec. A Job's template keeps an absent `restartPolicy`
/// absent: kube-apiserver asks for one (`Required value`) rather than defaulting it to `Always`,
/// which a Job may not have.
fn default_template(plural: &str, object: &mut Value, pointer: &str) {
    let Some(spec) = object.pointer_mut(&format!("{pointer}/spec")) else {
        return;
    };
    if !spec.is_object() {
        return;
    }
    let batch = matches!(plural, "jobs" | "cronjobs");
    let had_policy = !spec["restartPolicy"].is_null();
    objects::default_pod_spec(spec);
    if batch
        && !had_policy
        && let Some(map) = spec.as_object_mut()
    {
        map.remove("restartPolicy");
    }
    mirror_service_account(spec);
}

/// `serviceAccount` is the deprecated twin of `serviceAccountName`: kube-apiserver reads the old
/// name when the new one is empty and writes the new one back into the old.
fn mirror_service_account(spec: &mut Value) {
    let name = match spec["serviceAccountName"]
        .as_str()
        .filter(|n| !n.is_empty())
    {
        Some(name) => name.to_string(),
        None => match spec["serviceAccount"].as_str().filter(|n| !n.is_empty()) {
            Some(old) => old.to_string(),
            None => return,
        },
    };
    spec["serviceAccountName"] = json!(name);
    spec["serviceAccount"] = json!(name);
}

/// kube-apiserver's ServiceAccount admission on a new pod: no `serviceAccountName` means the
/// namespace's `default` one. The account's existence is not checked and no token volume is
/// added (docs/workloads.md).
pub fn admit_service_account(pod: &mut Value) {
    if !pod["spec"].is_object() {
        return;
    }
    mirror_service_account(&mut pod["spec"]);
    if pod["spec"]["serviceAccountName"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        pod["spec"]["serviceAccountName"] = json!("default");
        pod["spec"]["serviceAccount"] = json!("default");
    }
}

/// What a new object of these kinds gets beyond defaults: an empty status (a client cannot
/// create one with a status) and, for a Job without `manualSelector`, the generated selector
/// and pod labels.
pub fn prepare_create(info: &ResourceInfo, object: &mut Value) {
    default(info, object);
    if !is_apps(info.plural) && !matches!(info.plural, "jobs" | "cronjobs") {
        return;
    }
    object["status"] = json!({});
    if info.plural == "jobs" && object["spec"]["manualSelector"] != json!(true) {
        generate_job_selector(object);
    }
}

/// The Job's selector is its uid, and its template carries the uid and name labels; a Job
/// without labels of its own takes its template's.
fn generate_job_selector(job: &mut Value) {
    if !job["spec"].is_object() || !job["metadata"].is_object() {
        return;
    }
    let uid = job["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if job["spec"]["selector"].is_null() {
        job["spec"]["selector"] = json!({"matchLabels": {JOB_CONTROLLER_UID_LABEL: uid}});
    }
    let Some(labels) = object_at(job, "/spec/template/metadata/labels") else {
        return;
    };
    for (key, value) in [
        (JOB_CONTROLLER_UID_LABEL, &uid),
        (JOB_NAME_LABEL, &name),
        (LEGACY_JOB_LABELS[0], &uid),
        (LEGACY_JOB_LABELS[1], &name),
    ] {
        labels.insert(key.into(), json!(value));
    }
    let labels = Value::Object(labels.clone());
    let own = &job["metadata"]["labels"];
    if own.is_null() || own.as_object().is_some_and(Map::is_empty) {
        job["metadata"]["labels"] = labels;
    }
}

// ---------------------------------------------------------------------------------------------
// Label selectors (metav1.LabelSelector)
// ---------------------------------------------------------------------------------------------

/// One requirement of a `metav1.LabelSelector`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    operator: String,
    values: Vec<String>,
}

/// The requirements of a `metav1.LabelSelector` (matchLabels first, then matchExpressions), or
/// the causes (under `field`) that make it invalid.
fn requirements(selector: &Value, field: &str) -> Result<Vec<Requirement>, Vec<Cause>> {
    let mut out = Vec::new();
    let mut causes = Vec::new();
    if let Some(labels) = selector["matchLabels"].as_object() {
        for (key, value) in labels {
            match value.as_str() {
                Some(v) => out.push(Requirement {
                    key: key.clone(),
                    operator: "In".into(),
                    values: vec![v.to_string()],
                }),
                None => causes.push(Cause {
                    field: format!("{field}.matchLabels"),
                    message: format!("Invalid value: {value}: must be a string"),
                }),
            }
        }
    }
    for (i, expression) in array(&selector["matchExpressions"]).iter().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let key = expression["key"].as_str().unwrap_or_default().to_string();
        let operator = expression["operator"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let values: Vec<String> = array(&expression["values"])
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        if key.is_empty() {
            causes.push(Cause {
                field: format!("{at}.key"),
                message: "Required value".into(),
            });
        }
        match operator.as_str() {
            "In" | "NotIn" if values.is_empty() => causes.push(Cause {
                field: format!("{at}.values"),
                message: "Required value: must be specified when `operator` is 'In' or 'NotIn'"
                    .into(),
            }),
            "Exists" | "DoesNotExist" if !values.is_empty() => causes.push(Cause {
                field: format!("{at}.values"),
                message:
                    "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
                        .into(),
            }),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => causes.push(Cause {
                field: format!("{at}.operator"),
                message: format!("Invalid value: {other:?}: not a valid selector operator"),
            }),
        }
        out.push(Requirement {
            key,
            operator,
            values,
        });
    }
    if causes.is_empty() {
        Ok(out)
    } else {
        Err(causes)
    }
}

/// Whether `labels` satisfy every requirement.
fn satisfied(requirements: &[Requirement], labels: &BTreeMap<String, String>) -> bool {
    requirements.iter().all(|r| {
        let value = labels.get(&r.key);
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| r.values.contains(v)),
            "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    })
}

/// Whether the `metav1.LabelSelector` `selector` selects an object with `labels`; an invalid
/// selector selects nothing. An empty selector selects everything.
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let Ok(requirements) = requirements(selector, "selector") else {
        return false;
    };
    satisfied(&requirements, &string_map(labels))
}

/// A `metav1.LabelSelector` as the label-selector string kube-apiserver prints (and puts in a
/// Scale's `status.selector`): requirements sorted by key, `k=v`, `k in (a,b)`,
/// `k notin (a,b)`, `k`, `!k`. Empty for an empty or absent selector.
pub fn selector_string(selector: &Value) -> String {
    let Ok(mut requirements) = requirements(selector, "selector") else {
        return String::new();
    };
    requirements.sort_by(|a, b| a.key.cmp(&b.key));
    requirements
        .iter()
        .map(|r| {
            let mut values = r.values.clone();
            values.sort();
            match r.operator.as_str() {
                "In" if values.len() == 1 && is_match_label(selector, r) => {
                    format!("{}={}", r.key, values[0])
                }
                "In" => format!("{} in ({})", r.key, values.join(",")),
                "NotIn" => format!("{} notin ({})", r.key, values.join(",")),
                "Exists" => r.key.clone(),
                _ => format!("!{}", r.key),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn is_match_label(selector: &Value, r: &Requirement) -> bool {
    selector["matchLabels"][&r.key].as_str() == r.values.first().map(String::as_str)
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
        .collect()
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// `field: Invalid value: <value>: must be greater than or equal to 0` for a negative integer.
fn non_negative(spec: &Value, key: &str, causes: &mut Vec<Cause>) {
    let value = &spec[key];
    if value.is_null() {
        return;
    }
    match value.as_i64() {
        Some(n) if n >= 0 => {}
        Some(n) => causes.push(Cause {
            field: format!("spec.{key}"),
            message: format!("Invalid value: {n}: must be greater than or equal to 0"),
        }),
        None => causes.push(Cause {
            field: format!("spec.{key}"),
            message: format!("Invalid value: {value}: must be an integer"),
        }),
    }
}

fn one_of(value: &Value, field: &str, allowed: &[&str], causes: &mut Vec<Cause>) {
    let text = value.as_str().unwrap_or_default();
    if value.is_null() || allowed.contains(&text) {
        return;
    }
    let supported: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    causes.push(Cause {
        field: field.into(),
        message: format!(
            "Unsupported value: {value}: supported values: {}",
            supported.join(", ")
        ),
    });
}

/// The selector of an apps/v1 kind (or a Job with `manualSelector`): required, not empty,
/// well formed, and selecting the template's labels.
fn validate_selector(plural: &str, spec: &Value, causes: &mut Vec<Cause>) {
    let selector = &spec["selector"];
    let template_labels = &spec["template"]["metadata"]["labels"];
    let mismatch = |causes: &mut Vec<Cause>| {
        causes.push(Cause {
            field: "spec.template.metadata.labels".into(),
            message: format!(
                "Invalid value: {}: `selector` does not match template `labels`",
                compact(template_labels)
            ),
        })
    };
    if selector.is_null() {
        causes.push(Cause {
            field: "spec.selector".into(),
            message: "Required value".into(),
        });
        mismatch(causes);
        return;
    }
    if !selector.is_object() {
        causes.push(Cause {
            field: "spec.selector".into(),
            message: format!("Invalid value: {selector}: must be an object"),
        });
        return;
    }
    match requirements(selector, "spec.selector") {
        Err(mut errors) => causes.append(&mut errors),
        Ok(requirements) if requirements.is_empty() => {
            let kind = plural.trim_end_matches('s');
            causes.push(Cause {
                field: "spec.selector".into(),
                message: format!(
                    "Invalid value: {}: empty selector is invalid for {kind}",
                    compact(selector)
                ),
            });
        }
        Ok(requirements) => {
            if !satisfied(&requirements, &string_map(template_labels)) {
                mismatch(causes);
            }
        }
    }
}

/// A value as kube-apiserver prints it in messages (compact JSON; `null` for nothing).
fn compact(value: &Value) -> String {
    if value.is_null() {
        "null".into()
    } else {
        value.to_string()
    }
}

/// The template's pod spec through the pod rules, its causes moved under `field`.
fn validate_template(plural: &str, object: &Value, causes: &mut Vec<Cause>) {
    let Some(pointer) = template_path(plural) else {
        return;
    };
    let field = template_field(plural);
    let template = object.pointer(pointer).unwrap_or(&Value::Null);
    if !template.is_object() {
        causes.push(Cause {
            field: field.into(),
            message: "Required value".into(),
        });
        return;
    }
    if !template["spec"].is_object() {
        causes.push(Cause {
            field: format!("{field}.spec"),
            message: "Required value".into(),
        });
        return;
    }
    let pod = json!({"metadata": template["metadata"].clone(), "spec": template["spec"].clone()});
    let mut pod_causes = Vec::new();
    objects::validate_pod(&pod, &mut pod_causes);
    for cause in pod_causes {
        causes.push(Cause {
            field: format!("{field}.{}", cause.field),
            message: cause.message,
        });
    }
    let policy = &template["spec"]["restartPolicy"];
    let policy_field = format!("{field}.spec.restartPolicy");
    if matches!(plural, "jobs" | "cronjobs") {
        if policy.is_null() {
            causes.push(Cause {
                field: policy_field,
                message: "Required value: valid values: \"OnFailure\", \"Never\"".into(),
            });
        } else {
            one_of(policy, &policy_field, &["OnFailure", "Never"], causes);
        }
    } else {
        one_of(policy, &policy_field, &["Always"], causes);
    }
}

/// An `intstr.IntOrString` field: a non-negative integer or a percentage; its value in percent
/// or count for the "both zero" rule.
fn int_or_percent(value: &Value, field: &str, causes: &mut Vec<Cause>) -> Option<i64> {
    match value {
        Value::Null => None,
        Value::Number(n) => match n.as_i64() {
            Some(n) if n >= 0 => Some(n),
            _ => {
                causes.push(Cause {
                    field: field.into(),
                    message: format!("Invalid value: {n}: must be greater than or equal to 0"),
                });
                None
            }
        },
        Value::String(text) => match text.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) if (0..=100).contains(&p) => Some(p),
            Some(p) if p < 0 => {
                causes.push(Cause {
                    field: field.into(),
                    message: format!("Invalid value: {text:?}: must be greater than or equal to 0"),
                });
                None
            }
            Some(_) => {
                causes.push(Cause {
                    field: field.into(),
                    message: format!("Invalid value: {text:?}: must not be greater than 100%"),
                });
                None
            }
            None => {
                causes.push(Cause {
                    field: field.into(),
                    message: format!(
                        "Invalid value: {text:?}: a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')"
                    ),
                });
                None
            }
        },
        other => {
            causes.push(Cause {
                field: field.into(),
                message: format!("Invalid value: {other}: must be an integer or a percentage"),
            });
            None
        }
    }
}

/// `maxUnavailable` and `maxSurge` of a rolling update may not both be zero.
fn validate_rolling(rolling: &Value, field: &str, causes: &mut Vec<Cause>) {
    let unavailable_field = format!("{field}.maxUnavailable");
    let unavailable = int_or_percent(&rolling["maxUnavailable"], &unavailable_field, causes);
    let surge = int_or_percent(&rolling["maxSurge"], &format!("{field}.maxSurge"), causes);
    if unavailable == Some(0) && surge.unwrap_or(0) == 0 {
        causes.push(Cause {
            field: unavailable_field,
            message: format!(
                "Invalid value: {}: may not be 0 when `maxSurge` is 0",
                compact(&rolling["maxUnavailable"])
            ),
        });
    }
}

/// Validation of these kinds on create and update; other kinds are left alone.
pub fn validate(info: &ResourceInfo, object: &Value, causes: &mut Vec<Cause>) {
    if info.group.is_empty() {
        return;
    }
    let spec = &object["spec"];
    let plural = info.plural;
    if is_apps(plural) {
        validate_selector(plural, spec, causes);
        validate_template(plural, object, causes);
        for key in ["replicas", "minReadySeconds", "revisionHistoryLimit"] {
            non_negative(spec, key, causes);
        }
    }
    match plural {
        "deployments" => validate_deployment(spec, causes),
        "daemonsets" => {
            let strategy = &spec["updateStrategy"];
            one_of(
                &strategy["type"],
                "spec.updateStrategy.type",
                &["RollingUpdate", "OnDelete"],
                causes,
            );
            if strategy["type"] == "RollingUpdate" {
                validate_rolling(
                    &strategy["rollingUpdate"],
                    "spec.updateStrategy.rollingUpdate",
                    causes,
                );
            }
        }
        "statefulsets" => {
            one_of(
                &spec["podManagementPolicy"],
                "spec.podManagementPolicy",
                &["OrderedReady", "Parallel"],
                causes,
            );
            one_of(
                &spec["updateStrategy"]["type"],
                "spec.updateStrategy.type",
                &["RollingUpdate", "OnDelete"],
                causes,
            );
            if let Some(partition) = spec["updateStrategy"]["rollingUpdate"]["partition"].as_i64()
                && partition < 0
            {
                causes.push(Cause {
                    field: "spec.updateStrategy.rollingUpdate.partition".into(),
                    message: format!(
                        "Invalid value: {partition}: must be greater than or equal to 0"
                    ),
                });
            }
        }
        "jobs" => validate_job(object, causes),
        "cronjobs" => validate_cronjob(object, causes),
        "controllerrevisions" => {
            if let Some(revision) = object["revision"].as_i64()
                && revision < 0
            {
                causes.push(Cause {
                    field: "revision".into(),
                    message: format!(
                        "Invalid value: {revision}: must be greater than or equal to 0"
                    ),
                });
            }
        }
        _ => {}
    }
}

fn validate_deployment(spec: &Value, causes: &mut Vec<Cause>) {
    let strategy = &spec["strategy"];
    one_of(
        &strategy["type"],
        "spec.strategy.type",
        &["Recreate", "RollingUpdate"],
        causes,
    );
    match strategy["type"].as_str() {
        Some("Recreate") if !strategy["rollingUpdate"].is_null() => causes.push(Cause {
            field: "spec.strategy.rollingUpdate".into(),
            message: "Forbidden: may not be specified when strategy `type` is 'Recreate'".into(),
        }),
        Some("RollingUpdate") => {
            validate_rolling(
                &strategy["rollingUpdate"],
                "spec.strategy.rollingUpdate",
                causes,
            );
        }
        _ => {}
    }
    non_negative(spec, "progressDeadlineSeconds", causes);
    if let (Some(deadline), min_ready) = (
        spec["progressDeadlineSeconds"].as_i64(),
        spec["minReadySeconds"].as_i64().unwrap_or(0),
    ) && deadline <= min_ready
    {
        causes.push(Cause {
            field: "spec.progressDeadlineSeconds".into(),
            message: format!("Invalid value: {deadline}: must be greater than minReadySeconds"),
        });
    }
}

fn validate_job(job: &Value, causes: &mut Vec<Cause>) {
    let spec = &job["spec"];
    for key in [
        "parallelism",
        "completions",
        "backoffLimit",
        "ttlSecondsAfterFinished",
    ] {
        non_negative(spec, key, causes);
    }
    if let Some(deadline) = spec["activeDeadlineSeconds"].as_i64()
        && deadline <= 0
    {
        causes.push(Cause {
            field: "spec.activeDeadlineSeconds".into(),
            message: format!("Invalid value: {deadline}: must be greater than 0"),
        });
    }
    one_of(
        &spec["completionMode"],
        "spec.completionMode",
        &["NonIndexed", "Indexed"],
        causes,
    );
    if spec["completionMode"] == "Indexed" && spec["completions"].is_null() {
        causes.push(Cause {
            field: "spec.completions".into(),
            message: "Required value: when completion mode is Indexed".into(),
        });
    }
    if spec["manualSelector"] == json!(true) {
        validate_selector("jobs", spec, causes);
    } else {
        let uid = job["metadata"]["uid"].as_str().unwrap_or_default();
        let generated = json!({"matchLabels": {JOB_CONTROLLER_UID_LABEL: uid}});
        if spec["selector"] != generated {
            causes.push(Cause {
                field: "spec.selector".into(),
                message: format!(
                    "Invalid value: {}: `selector` not auto-generated",
                    compact(&spec["selector"])
                ),
            });
        } else if spec["template"]["metadata"]["labels"][JOB_CONTROLLER_UID_LABEL] != uid {
            causes.push(Cause {
                field: format!("spec.template.metadata.labels[{JOB_CONTROLLER_UID_LABEL}]"),
                message: format!("Required value: must be '{uid}'"),
            });
        }
    }
    validate_template("jobs", job, causes);
}

fn validate_cronjob(cronjob: &Value, causes: &mut Vec<Cause>) {
    let spec = &cronjob["spec"];
    let name = cronjob["metadata"]["name"].as_str().unwrap_or_default();
    if name.len() > CRONJOB_NAME_MAX {
        causes.push(Cause {
            field: "metadata.name".into(),
            message: format!(
                "Invalid value: {name:?}: must be no more than {CRONJOB_NAME_MAX} characters"
            ),
        });
    }
    // spec.schedule and spec.timeZone: `objects::validate_cronjob_schedule`, with the
    // CronJob controller's own parser.
    one_of(
        &spec["concurrencyPolicy"],
        "spec.concurrencyPolicy",
        &["Allow", "Forbid", "Replace"],
        causes,
    );
    for key in [
        "startingDeadlineSeconds",
        "successfulJobsHistoryLimit",
        "failedJobsHistoryLimit",
    ] {
        non_negative(spec, key, causes);
    }
    validate_template("cronjobs", cronjob, causes);
}

// ---------------------------------------------------------------------------------------------
// Updates
// ---------------------------------------------------------------------------------------------

fn immutable(field: &str, value: &Value) -> Cause {
    Cause {
        field: field.into(),
        message: format!("Invalid value: {}: field is immutable", compact(value)),
    }
}

/// The StatefulSet spec fields an update may change.
const STATEFULSET_MUTABLE: &[&str] = &[
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "revisionHistoryLimit",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

/// The update rules of these kinds beyond the generic ones (after `new` was defaulted and its
/// status and generation set): immutable selectors, what a StatefulSet and a Job may change,
/// and a Deployment's generation moving on an annotation change (its annotations are copied to
/// its ReplicaSets).
pub fn prepare_update(
    info: &ResourceInfo,
    current: &Value,
    new: &mut Value,
) -> Result<(), ApiError> {
    if info.group.is_empty() {
        return Ok(());
    }
    let mut causes = Vec::new();
    let (old_spec, new_spec) = (&current["spec"], &new["spec"]);
    if (is_apps(info.plural) || info.plural == "jobs")
        && new_spec["selector"] != old_spec["selector"]
    {
        causes.push(immutable("spec.selector", &new_spec["selector"]));
    }
    match info.plural {
        "statefulsets" => {
            let strip = |spec: &Value| -> Value {
                let mut spec = spec.clone();
                if let Some(map) = spec.as_object_mut() {
                    for key in STATEFULSET_MUTABLE {
                        map.remove(*key);
                    }
                }
                spec
            };
            if strip(old_spec) != strip(new_spec) {
                causes.push(Cause {
                    field: "spec".into(),
                    message: "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into(),
                });
            }
        }
        "jobs" => {
            for key in ["completionMode", "completions"] {
                if new_spec[key] != old_spec[key] {
                    causes.push(immutable(&format!("spec.{key}"), &new_spec[key]));
                }
            }
            // A suspended Job that never started may change its template (scheduling
            // directives, in kube-apiserver); any other Job's template is fixed.
            let never_started =
                current["status"]["startTime"].is_null() && old_spec["suspend"] == json!(true);
            if new_spec["template"] != old_spec["template"] && !never_started {
                causes.push(immutable("spec.template", &new_spec["template"]));
            }
        }
        "deployments" => {
            let bumped = new["metadata"]["generation"] != current["metadata"]["generation"];
            if !bumped
                && new["metadata"]["annotations"] != current["metadata"]["annotations"]
                && let Some(g) = current["metadata"]["generation"].as_i64()
            {
                new["metadata"]["generation"] = json!(g + 1);
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        let name = current["metadata"]["name"].as_str().unwrap_or_default();
        Err(ApiError::invalid(info.kind, name, causes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources;
    use time::OffsetDateTime;

    fn info(plural: &str) -> &'static ResourceInfo {
        resources::builtin()
            .iter()
            .find(|r| r.plural == plural)
            .expect("builtin")
    }

    fn create(plural: &str, mut object: Value) -> Result<Value, ApiError> {
        objects::prepare_create(info(plural), &mut object, OffsetDateTime::now_utc())?;
        Ok(object)
    }

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.25", "ports": [{"containerPort": 80}]}]}
                }
            }
        })
    }

    fn fields(e: &ApiError) -> Vec<&str> {
        e.causes().iter().map(|c| c.field.as_str()).collect()
    }

    #[test]
    fn a_deployment_gets_kube_apiservers_defaults() {
        let d = create("deployments", deployment()).expect("valid");
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["progressDeadlineSeconds"], 600);
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["dnsPolicy"], "ClusterFirst");
        assert!(pod["enableServiceLinks"].is_null(), "a pod's own default");
        let c = &pod["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(d["metadata"]["generation"], 1);
        assert_eq!(d["status"], json!({}));
    }

    #[test]
    fn the_other_kinds_get_their_defaults() {
        let template = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        let apps = |extra: Value| {
            let mut o = json!({"metadata": {"name": "x"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": template.clone()}});
            if let Some(m) = extra.as_object() {
                for (k, v) in m {
                    o["spec"][k] = v.clone();
                }
            }
            o
        };
        let ds = create("daemonsets", apps(json!({}))).expect("valid");
        assert_eq!(
            ds["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
        );
        assert!(ds["spec"]["replicas"].is_null());
        let sts = create("statefulsets", apps(json!({}))).expect("valid");
        assert_eq!(sts["spec"]["podManagementPolicy"], "OrderedReady");
        assert_eq!(
            sts["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        );
        assert_eq!(sts["spec"]["serviceName"], "");
        let rs = create("replicasets", apps(json!({}))).expect("valid");
        assert_eq!(rs["spec"]["replicas"], 1);

        let mut job_template = template.clone();
        job_template["spec"]["restartPolicy"] = json!("Never");
        let job = create(
            "jobs",
            json!({"metadata": {"name": "j"}, "spec": {"template": job_template}}),
        )
        .expect("valid");
        let uid = job["metadata"]["uid"].as_str().expect("uid");
        let spec = &job["spec"];
        for (key, want) in [
            ("completions", json!(1)),
            ("parallelism", json!(1)),
            ("backoffLimit", json!(6)),
            ("completionMode", json!("NonIndexed")),
            ("suspend", json!(false)),
            ("manualSelector", json!(false)),
            ("podReplacementPolicy", json!("TerminatingOrFailed")),
        ] {
            assert_eq!(spec[key], want, "{key}");
        }
        assert_eq!(
            spec["selector"],
            json!({"matchLabels": {JOB_CONTROLLER_UID_LABEL: uid}})
        );
        let labels = &spec["template"]["metadata"]["labels"];
        assert_eq!(labels[JOB_CONTROLLER_UID_LABEL], uid);
        assert_eq!(labels[JOB_NAME_LABEL], "j");
        assert_eq!(labels["controller-uid"], uid);
        assert_eq!(labels["a"], "b", "the template's own labels stay");
        assert_eq!(&job["metadata"]["labels"], labels);

        let mut cj_template = template;
        cj_template["spec"]["restartPolicy"] = json!("OnFailure");
        let cj = create(
            "cronjobs",
            json!({"metadata": {"name": "c"}, "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": cj_template}}}}),
        )
        .expect("valid");
        for (key, want) in [
            ("concurrencyPolicy", json!("Allow")),
            ("suspend", json!(false)),
            ("successfulJobsHistoryLimit", json!(3)),
            ("failedJobsHistoryLimit", json!(1)),
        ] {
            assert_eq!(cj["spec"][key], want, "{key}");
        }
        assert_eq!(
            cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "Always"
        );
    }

    #[test]
    fn invalid_deployments_are_refused_with_kube_apiservers_paths() {
        let mut d = deployment();
        d["spec"]["replicas"] = json!(-1);
        d["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        d["spec"]["template"]["spec"]["restartPolicy"] = json!("OnFailure");
        let e = create("deployments", d).expect_err("invalid");
        assert_eq!(e.reason, "Invalid");
        assert_eq!(
            fields(&e),
            [
                "spec.template.metadata.labels",
                "spec.template.spec.restartPolicy",
                "spec.replicas"
            ]
        );
        assert!(
            e.message.contains(
                "spec.template.metadata.labels: Invalid value: {\"app\":\"other\"}: `selector` does not match template `labels`"
            ),
            "{}",
            e.message
        );

        let mut d = deployment();
        d["spec"].as_object_mut().expect("spec").remove("selector");
        d["spec"]["template"]["spec"]["containers"][0]["name"] = json!("Web");
        let e = create("deployments", d).expect_err("invalid");
        assert_eq!(
            fields(&e),
            [
                "spec.selector",
                "spec.template.metadata.labels",
                "spec.template.spec.containers[0].name"
            ]
        );

        let mut d = deployment();
        d["spec"]["strategy"] = json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}});
        let e = create("deployments", d).expect_err("invalid");
        assert_eq!(fields(&e), ["spec.strategy.rollingUpdate.maxUnavailable"]);
    }

    #[test]
    fn a_job_needs_its_generated_selector_and_a_batch_restart_policy() {
        let e = create(
            "jobs",
            json!({"metadata": {"name": "j"}, "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
            }}),
        )
        .expect_err("invalid");
        assert_eq!(
            fields(&e),
            ["spec.selector", "spec.template.spec.restartPolicy"]
        );
        assert!(
            e.message.contains("`selector` not auto-generated"),
            "{}",
            e.message
        );
        assert!(
            e.message
                .contains("Required value: valid values: \"OnFailure\", \"Never\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn selectors_are_immutable_and_generation_follows_the_spec() {
        let current = create("deployments", deployment()).expect("valid");
        let update =
            |new: &mut Value| objects::prepare_update(info("deployments"), None, &current, new);
        let mut new = current.clone();
        new["metadata"]["labels"] = json!({"x": "y"});
        update(&mut new).expect("labels");
        assert_eq!(new["metadata"]["generation"], 1, "labels do not bump it");
        let mut new = current.clone();
        new["status"] = json!({"replicas": 5});
        update(&mut new).expect("status ignored");
        assert_eq!(new["metadata"]["generation"], 1);
        assert_eq!(
            new["status"],
            json!({}),
            "status is kept from the stored object"
        );
        let mut new = current.clone();
        new["metadata"]["annotations"] = json!({"a": "b"});
        update(&mut new).expect("annotations");
        assert_eq!(
            new["metadata"]["generation"], 2,
            "a Deployment's annotations do"
        );
        let mut new = current.clone();
        new["spec"]["replicas"] = json!(3);
        update(&mut new).expect("replicas");
        assert_eq!(new["metadata"]["generation"], 2);
        // A client that leaves out defaulted fields changes nothing.
        let mut new = current.clone();
        new["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("revisionHistoryLimit");
        update(&mut new).expect("defaults");
        assert_eq!(new["metadata"]["generation"], 1);
        let mut new = current.clone();
        new["spec"]["selector"] = json!({"matchLabels": {"app": "x"}});
        new["spec"]["template"]["metadata"]["labels"] = json!({"app": "x"});
        let e = update(&mut new).expect_err("immutable");
        assert_eq!(fields(&e), ["spec.selector"]);
        assert!(e.message.contains("field is immutable"), "{}", e.message);
    }

    #[test]
    fn odd_shapes_are_refused_not_panicked_on() {
        for spec in [
            json!({"template": "x"}),
            json!({"template": {"spec": {"containers": ["x", 3]}}}),
            json!({"template": {"spec": {"containers": [{"name": "c", "image": "i", "ports": ["x"]}]}}}),
            json!({"strategy": "x", "updateStrategy": 1, "selector": []}),
            json!({"jobTemplate": {"spec": "x"}}),
        ] {
            for plural in [
                "deployments",
                "daemonsets",
                "statefulsets",
                "jobs",
                "cronjobs",
            ] {
                let object = json!({"metadata": {"name": "x"}, "spec": spec.clone()});
                assert!(create(plural, object).is_err(), "{plural} {spec}");
            }
        }
    }

    #[test]
    fn pods_get_the_default_service_account() {
        let pod = create(
            "pods",
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
        )
        .expect("valid");
        assert_eq!(pod["spec"]["serviceAccountName"], "default");
        assert_eq!(pod["spec"]["serviceAccount"], "default");
        let pod = create(
            "pods",
            json!({"metadata": {"name": "p"}, "spec": {"serviceAccount": "builder", "containers": [{"name": "c", "image": "busybox"}]}}),
        )
        .expect("valid");
        assert_eq!(pod["spec"]["serviceAccountName"], "builder");
    }

    #[test]
    fn selector_strings_are_sorted_like_kube_apiservers() {
        let s = json!({
            "matchLabels": {"tier": "front", "app": "web"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "dev"]},
                {"key": "legacy", "operator": "DoesNotExist"},
                {"key": "canary", "operator": "Exists"}
            ]
        });
        assert_eq!(
            selector_string(&s),
            "app=web,canary,env in (dev,prod),!legacy,tier=front"
        );
        assert_eq!(selector_string(&json!({})), "");
        assert!(selector_matches(
            &s,
            &json!({"app": "web", "tier": "front", "env": "dev", "canary": ""})
        ));
        assert!(!selector_matches(
            &s,
            &json!({"app": "web", "tier": "front", "env": "qa", "canary": ""})
        ));
    }
}
